#include "ext_rope.h"
#include "ext_common.h"
#include "cuda/rope.h"

void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions, bool neox)
{
    ext::check_tensor(x, at::kHalf, x, "x");
    TORCH_CHECK(x.dim() == 4, "x must be [batch, length, heads, head_dim], got ", x.sizes());
    TORCH_CHECK(cos.scalar_type() == at::kFloat || cos.scalar_type() == at::kHalf,
                "cos must be float32 or float16, got ", cos.scalar_type());
    ext::check_tensor(cos, cos.scalar_type(), x, "cos");
    ext::check_tensor(sin, cos.scalar_type(), x, "sin");
    TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes(), "cos and sin must be equal [positions, rotary_dim] "
                "tables, got ", cos.sizes(), " and ", sin.sizes());
    const int rot = (int) cos.size(1);
    const int head_dim = (int) x.size(3);
    TORCH_CHECK(rot % 2 == 0 && rot <= head_dim, "rotary_dim ", rot, " must be even and at most head_dim ", head_dim);
    const int64_t tokens = x.size(0) * x.size(1);
    TORCH_CHECK(positions.numel() == tokens, "positions has ", positions.numel(), " entries for ", tokens,
                " tokens (expected [batch, length])");
    if (tokens == 0) return;
    const c10::cuda::CUDAGuard guard(x.device());
    const at::Tensor pos = positions.to(x.device(), at::kLong).contiguous();
    const int heads = (int) x.size(2);
    const int table_len = (int) cos.size(0);
    const cudaError_t err = cos.scalar_type() == at::kFloat
        ? rope_cuda<float>(ext::ptr<half>(x), ext::ptr<const float>(cos), ext::ptr<const float>(sin),
                           ext::ptr<const int64_t>(pos), (int) tokens, heads, head_dim, rot, table_len, neox,
                           ext::stream_of(x))
        : rope_cuda<half>(ext::ptr<half>(x), ext::ptr<const half>(cos), ext::ptr<const half>(sin),
                          ext::ptr<const int64_t>(pos), (int) tokens, heads, head_dim, rot, table_len, neox,
                          ext::stream_of(x));
    ext::check_launch(err, "rope_");
}
