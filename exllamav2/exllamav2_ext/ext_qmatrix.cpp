#include "ext_qmatrix.h"
#include "ext_common.h"

#include <algorithm>

namespace {

void check_optional(const std::optional<at::Tensor>& t, at::ScalarType dtype, const at::Tensor& ref,
                    at::IntArrayRef shape, const char* name)
{
    TORCH_CHECK(t.has_value(), name, " is required for this format");
    ext::check_tensor(*t, dtype, ref, name);
    TORCH_CHECK(t->sizes() == shape, name, " has shape ", t->sizes(), ", expected ", shape);
}

}  // namespace

QMatrix::QMatrix(int64_t format, at::Tensor q_weight, at::Tensor chunks, std::optional<at::Tensor> perm,
                 std::optional<at::Tensor> q_scale, std::optional<at::Tensor> scale_max,
                 std::optional<at::Tensor> scales, std::optional<at::Tensor> qzeros, int64_t zero_offset,
                 int64_t in_features, int64_t out_features, std::optional<at::Tensor> bias)
    : format_((int) format), q_weight_(std::move(q_weight)), chunks_(std::move(chunks)), perm_(std::move(perm)),
      q_scale_(std::move(q_scale)), scale_max_(std::move(scale_max)), scales_(std::move(scales)),
      qzeros_(std::move(qzeros)), bias_(std::move(bias)), zero_offset_((int) zero_offset),
      in_features_(in_features), out_features_(out_features)
{
    TORCH_CHECK(format_ == QFORMAT_EXL2 || format_ == QFORMAT_GPTQ, "unknown quantized format ", format);
    ext::check_tensor(q_weight_, at::kInt, q_weight_, "q_weight");
    TORCH_CHECK(q_weight_.dim() == 2 && q_weight_.size(1) >= out_features, "q_weight must be [words, >= ",
                out_features, "], got ", q_weight_.sizes());
    ext::check_tensor(chunks_, at::kInt, q_weight_, "chunks");
    TORCH_CHECK(chunks_.dim() == 2 && chunks_.size(1) == Q_CHUNK_FIELDS, "chunks must be [n, ", Q_CHUNK_FIELDS,
                "], got ", chunks_.sizes());
    TORCH_CHECK(chunks_.size(0) <= 65535, "too many row chunks (", chunks_.size(0), ") for one layer");
    if (perm_) check_optional(perm_, at::kInt, q_weight_, {in_features}, "perm");
    if (bias_) check_optional(bias_, at::kHalf, q_weight_, {out_features}, "bias");
    if (format_ == QFORMAT_EXL2)
    {
        TORCH_CHECK(q_weight_.size(1) % 32 == 0, "EXL2 q_weight columns must be padded to a multiple of 32");
        TORCH_CHECK(scale_max_.has_value(), "scale_max is required for EXL2");
        const int64_t groups = scale_max_->numel();
        check_optional(scale_max_, at::kHalf, q_weight_, {groups}, "scale_max");
        check_optional(q_scale_, at::kInt, q_weight_, {groups, q_weight_.size(1) / 8}, "q_scale");
    }
    else
    {
        TORCH_CHECK(q_weight_.size(1) == out_features && out_features % 8 == 0,
                    "GPTQ qweight must have out_features (a multiple of 8) columns, got ", q_weight_.sizes());
        TORCH_CHECK(scales_.has_value(), "scales are required for GPTQ");
        const int64_t groups = scales_->size(0);
        check_optional(scales_, at::kHalf, q_weight_, {groups, out_features}, "scales");
        check_optional(qzeros_, at::kInt, q_weight_, {groups, out_features / 8}, "qzeros");
    }
}

QMatrixView QMatrix::view() const
{
    QMatrixView v{};
    v.format = format_;
    v.q_weight = ext::ptr<const uint32_t>(q_weight_);
    v.q_stride = (int) q_weight_.size(1);
    v.chunks = ext::ptr<const int32_t>(chunks_);
    v.num_chunks = (int) chunks_.size(0);
    v.perm = ext::ptr<const int32_t>(perm_);
    v.K = (int) in_features_;
    v.N = (int) out_features_;
    v.q_scale = ext::ptr<const uint32_t>(q_scale_);
    v.scale_max = ext::ptr<const half>(scale_max_);
    v.scales = ext::ptr<const half>(scales_);
    v.qzeros = ext::ptr<const uint32_t>(qzeros_);
    v.zero_offset = zero_offset_;
    return v;
}

void QMatrix::reconstruct(at::Tensor& out, int64_t col_start) const
{
    ext::check_tensor(out, at::kHalf, q_weight_, "out");
    TORCH_CHECK(out.dim() == 2 && out.size(0) == in_features_, "out must be [", in_features_, ", columns], got ",
                out.sizes());
    TORCH_CHECK(col_start >= 0 && col_start + out.size(1) <= out_features_, "columns [", col_start, ", ",
                col_start + out.size(1), ") exceed out_features ", out_features_);
    const c10::cuda::CUDAGuard guard(out.device());
    ext::check_launch(q_reconstruct_cuda(view(), ext::ptr<half>(out), (int) col_start, (int) out.size(1),
                                         ext::stream_of(out)), "q_reconstruct");
}

at::Tensor QMatrix::forward(const at::Tensor& x, int64_t max_fused_rows, int64_t max_dq_elements) const
{
    ext::check_cuda(x, "x");
    ext::check_dtype(x, at::kHalf, "x");
    TORCH_CHECK(x.device() == q_weight_.device(), "x is on ", x.device(), ", the weights on ", q_weight_.device());
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features_, "x has ", x.size(-1), " features, the layer expects ",
                in_features_);
    const c10::cuda::CUDAGuard guard(x.device());
    const at::Tensor x2 = x.reshape({-1, in_features_}).contiguous();
    const int64_t rows = x2.size(0);
    std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
    out_shape.back() = out_features_;

    if (rows <= max_fused_rows)
    {
        at::Tensor y = at::empty({rows, out_features_}, x.options());
        at::Tensor acc = at::empty({rows, out_features_}, x.options().dtype(at::kFloat));
        ext::check_launch(q_gemm_cuda(view(), ext::ptr<const half>(x2), (int) rows, (int) in_features_,
                                      ext::ptr<const half>(bias_), ext::ptr<float>(acc), ext::ptr<half>(y),
                                      ext::stream_of(x)), "q_gemm");
        return y.view(out_shape);
    }

    // Reconstruct column slices into one scratch buffer and multiply each (cuBLAS through at::mm).
    const int64_t slice = std::min<int64_t>(out_features_, std::max<int64_t>(128, max_dq_elements / in_features_ / 128 * 128));
    at::Tensor scratch = at::empty({in_features_ * slice}, x.options());
    at::Tensor y = at::empty({rows, out_features_}, x.options());
    for (int64_t c0 = 0; c0 < out_features_; c0 += slice)
    {
        const int64_t cols = std::min(slice, out_features_ - c0);
        at::Tensor w = scratch.narrow(0, 0, in_features_ * cols).view({in_features_, cols});
        reconstruct(w, c0);
        if (cols == out_features_) at::mm_out(y, x2, w);
        else y.narrow(1, c0, cols).copy_(at::mm(x2, w));
    }
    if (bias_) y.add_(*bias_);
    return y.view(out_shape);
}
