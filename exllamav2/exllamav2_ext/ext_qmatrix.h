#pragma once

#include <ATen/ATen.h>
#include <optional>

#include "cuda/q_matrix.h"

// A quantized linear layer's device tensors in kernel form (built by exllamav2/qmatrix.py, which prepares
// the chunk table and permutation). Holds references, never copies.
class QMatrix
{
public:
    QMatrix(int64_t format, at::Tensor q_weight, at::Tensor chunks, std::optional<at::Tensor> perm,
            std::optional<at::Tensor> q_scale, std::optional<at::Tensor> scale_max, std::optional<at::Tensor> scales,
            std::optional<at::Tensor> qzeros, int64_t zero_offset, int64_t in_features, int64_t out_features,
            std::optional<at::Tensor> bias);

    // y [..., N] = x [..., K] · W + bias. Up to max_fused_rows rows run the fused kernel; more rows reconstruct
    // W in column slices of at most max_dq_elements elements and multiply with cuBLAS (at::mm).
    at::Tensor forward(const at::Tensor& x, int64_t max_fused_rows, int64_t max_dq_elements) const;

    // out [K, c] (fp16, contiguous) = columns [col_start, col_start + c) of W, bit-exact with the twin.
    void reconstruct(at::Tensor& out, int64_t col_start) const;

private:
    QMatrixView view() const;

    int format_;
    at::Tensor q_weight_, chunks_;
    std::optional<at::Tensor> perm_, q_scale_, scale_max_, scales_, qzeros_, bias_;
    int zero_offset_;
    int64_t in_features_, out_features_;
};
