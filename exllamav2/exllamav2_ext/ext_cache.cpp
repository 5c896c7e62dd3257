#include "ext_cache.h"
#include "ext_common.h"
#include "cuda/cache.h"

namespace {

int64_t token_features(const at::Tensor& t)
{
    TORCH_CHECK(t.dim() >= 3, "cache tensors must be [batch, seq_len, ...], got ", t.sizes());
    return t.numel() / (t.size(0) * t.size(1));
}

// fp16 is the working tensor that fixes the token grid.
TokenWindow make_window(const at::Tensor& fp16, EXT_WINDOW_ARGS)
{
    TokenWindow w{};
    w.batch = (int) batch;
    w.seq_len = (int) fp16.size(1);
    w.offset = (int) offset;
    w.width = (int) width;
    TORCH_CHECK(batch >= 0 && width >= 0, "batch and width must be non-negative");
    TORCH_CHECK(seqlens.has_value() == block_table.has_value(), "paged conversion needs both seqlens and block_table");
    if (!seqlens)
    {
        TORCH_CHECK(batch <= fp16.size(0), "batch ", batch, " exceeds the cache's batch size ", fp16.size(0));
        TORCH_CHECK(offset >= 0 && offset + width <= fp16.size(1), "positions [", offset, ", ", offset + width,
                    ") fall outside the cache's ", fp16.size(1), " positions");
        return w;
    }
    ext::check_tensor(*seqlens, at::kInt, fp16, "seqlens");
    ext::check_tensor(*block_table, at::kInt, fp16, "block_table");
    TORCH_CHECK(block_table->dim() == 2 && block_table->size(0) == batch && seqlens->numel() == batch,
                "block_table must be [batch, pages] and seqlens [batch] for batch ", batch, ", got ",
                block_table->sizes(), " and ", seqlens->sizes());
    TORCH_CHECK(page_size > 0 && (fp16.size(0) * fp16.size(1)) % page_size == 0, "page_size ", page_size,
                " must divide the cache's ", fp16.size(0) * fp16.size(1), " token slots");
    w.seqlens = ext::ptr<const int32_t>(*seqlens);
    w.block_table = ext::ptr<const int32_t>(*block_table);
    w.pages_per_seq = (int) block_table->size(1);
    w.page_size = (int) page_size;
    w.start_at_seqlen = start_at_seqlen;
    w.end_at_seqlen = end_at_seqlen;
    return w;
}

int64_t padded_features(int64_t feat) { return (feat + 63) / 64 * 64; }

void check_q_storage(const at::Tensor& fp16, const at::Tensor& q, const at::Tensor& scales, int64_t bits)
{
    TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8, got ", bits);
    ext::check_tensor(q, at::kByte, fp16, "q");
    ext::check_aligned(q, 2, "q");                          // 8-bit codes move as byte pairs
    ext::check_tensor(scales, at::kHalf, fp16, "scales");
    const int64_t padded = padded_features(token_features(fp16));
    TORCH_CHECK(q.size(0) == fp16.size(0) && q.size(1) == fp16.size(1) && token_features(q) == padded * bits / 8,
                "q must be [", fp16.size(0), ", ", fp16.size(1), ", ", padded * bits / 8, "], got ", q.sizes());
    TORCH_CHECK(scales.size(0) == fp16.size(0) && scales.size(1) == fp16.size(1) && token_features(scales) == padded / 32,
                "scales must be [", fp16.size(0), ", ", fp16.size(1), ", ", padded / 32, "], got ", scales.sizes());
}

void check_fp16(const at::Tensor& t)
{
    ext::check_tensor(t, at::kHalf, t, "fp16 tensor");
    ext::check_aligned(t, 4, "fp16 tensor");
    TORCH_CHECK(token_features(t) % 2 == 0, "kv_heads * head_dim must be even, got ", token_features(t));
}

void check_fp8_storage(const at::Tensor& fp16, const at::Tensor& fp8)
{
    ext::check_tensor(fp8, at::kByte, fp16, "fp8 storage");
    ext::check_aligned(fp8, 2, "fp8 storage");              // bytes move in pairs
    TORCH_CHECK(fp8.sizes() == fp16.sizes(), "fp8 storage ", fp8.sizes(), " must match the fp16 tensor ", fp16.sizes());
}

}  // namespace

#define EXT_WINDOW_PASS batch, offset, width, seqlens, block_table, page_size, start_at_seqlen, end_at_seqlen

void fp16_to_fp8(const at::Tensor& src, at::Tensor& dst, EXT_WINDOW_ARGS)
{
    check_fp16(src);
    check_fp8_storage(src, dst);
    const TokenWindow w = make_window(src, EXT_WINDOW_PASS);
    const c10::cuda::CUDAGuard guard(src.device());
    ext::check_launch(fp16_to_fp8_cuda(ext::ptr<const half>(src), ext::ptr<uint8_t>(dst), (int) token_features(src),
                                       w, ext::stream_of(src)), "fp16_to_fp8");
}

void fp8_to_fp16(const at::Tensor& src, at::Tensor& dst, EXT_WINDOW_ARGS)
{
    check_fp16(dst);
    check_fp8_storage(dst, src);
    const TokenWindow w = make_window(dst, EXT_WINDOW_PASS);
    const c10::cuda::CUDAGuard guard(dst.device());
    ext::check_launch(fp8_to_fp16_cuda(ext::ptr<const uint8_t>(src), ext::ptr<half>(dst), (int) token_features(dst),
                                       w, ext::stream_of(dst)), "fp8_to_fp16");
}

void fp16_to_q(const at::Tensor& src, at::Tensor& q, at::Tensor& scales, int64_t bits, EXT_WINDOW_ARGS)
{
    check_fp16(src);
    check_q_storage(src, q, scales, bits);
    const TokenWindow w = make_window(src, EXT_WINDOW_PASS);
    const int64_t feat = token_features(src);
    const c10::cuda::CUDAGuard guard(src.device());
    ext::check_launch(fp16_to_q_cuda(ext::ptr<const half>(src), ext::ptr<uint8_t>(q), ext::ptr<half>(scales),
                                     (int) feat, (int) padded_features(feat), (int) bits, w, ext::stream_of(src)),
                      "fp16_to_q");
}

void q_to_fp16(const at::Tensor& q, const at::Tensor& scales, at::Tensor& dst, int64_t bits, EXT_WINDOW_ARGS)
{
    check_fp16(dst);
    check_q_storage(dst, q, scales, bits);
    const TokenWindow w = make_window(dst, EXT_WINDOW_PASS);
    const int64_t feat = token_features(dst);
    const c10::cuda::CUDAGuard guard(dst.device());
    ext::check_launch(q_to_fp16_cuda(ext::ptr<const uint8_t>(q), ext::ptr<const half>(scales), ext::ptr<half>(dst),
                                     (int) feat, (int) padded_features(feat), (int) bits, w, ext::stream_of(dst)),
                      "q_to_fp16");
}
