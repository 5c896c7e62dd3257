#pragma once

#include <ATen/ATen.h>
#include <optional>

// y = RMSNorm(x) over the last dim; x fp16 CUDA, weight fp16 or fp32 [dim].
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
// y = LayerNorm(x) over the last dim; weight (and bias, if given) fp16 or fp32 [dim], same dtype.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, double eps);
