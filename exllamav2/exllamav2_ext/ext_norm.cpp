#include "ext_norm.h"
#include "ext_common.h"
#include "cuda/norm.h"

namespace {

void check_norm_args(const at::Tensor& x, const at::Tensor& w, const char* wname)
{
    ext::check_cuda(x, "x");
    ext::check_dtype(x, at::kHalf, "x");
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "x must have a non-empty last dimension");
    TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kFloat, wname,
                " must be float16 or float32, got ", w.scalar_type());
    ext::check_tensor(w, w.scalar_type(), x, wname);
    TORCH_CHECK(w.numel() == x.size(-1), wname, " has ", w.numel(), " elements, x's last dimension is ", x.size(-1));
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps)
{
    check_norm_args(x, weight, "weight");
    const c10::cuda::CUDAGuard guard(x.device());
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty_like(xc);
    const int dim = (int) xc.size(-1);
    const int rows = (int) (xc.numel() / dim);
    const half* xp = ext::ptr<const half>(xc);
    half* yp = ext::ptr<half>(y);
    const cudaError_t err = weight.scalar_type() == at::kHalf
        ? rms_norm_cuda<half>(xp, ext::ptr<const half>(weight), yp, rows, dim, (float) eps, ext::stream_of(x))
        : rms_norm_cuda<float>(xp, ext::ptr<const float>(weight), yp, rows, dim, (float) eps, ext::stream_of(x));
    ext::check_launch(err, "rms_norm");
    return y;
}

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, double eps)
{
    check_norm_args(x, weight, "weight");
    if (bias)
    {
        check_norm_args(x, *bias, "bias");
        TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), "bias dtype ", bias->scalar_type(),
                    " differs from weight dtype ", weight.scalar_type());
    }
    const c10::cuda::CUDAGuard guard(x.device());
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty_like(xc);
    const int dim = (int) xc.size(-1);
    const int rows = (int) (xc.numel() / dim);
    const half* xp = ext::ptr<const half>(xc);
    half* yp = ext::ptr<half>(y);
    const cudaError_t err = weight.scalar_type() == at::kHalf
        ? layer_norm_cuda<half>(xp, ext::ptr<const half>(weight), ext::ptr<const half>(bias), yp, rows, dim,
                                (float) eps, ext::stream_of(x))
        : layer_norm_cuda<float>(xp, ext::ptr<const float>(weight), ext::ptr<const float>(bias), yp, rows, dim,
                                 (float) eps, ext::stream_of(x));
    ext::check_launch(err, "layer_norm");
    return y;
}
