// RMSNorm and LayerNorm over the last dimension of a [rows, dim] fp16 matrix; statistics in fp32.
// Twins: exllamav2.norm.rms_norm / layer_norm. Weights and bias are fp16 or fp32 (W = half or float).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

template <typename W>
cudaError_t rms_norm_cuda(const half* x, const W* weight, half* y, int rows, int dim, float eps,
                          cudaStream_t stream);

template <typename W>
cudaError_t layer_norm_cuda(const half* x, const W* weight, const W* bias, half* y, int rows, int dim,
                            float eps, cudaStream_t stream);
