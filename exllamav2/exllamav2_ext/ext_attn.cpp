#include "ext_attn.h"
#include "ext_common.h"
#include "cuda/paged_attn.h"

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_pages,
                           at::Tensor& v_pages, const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                           double scale, int64_t window, double softcap)
{
    ext::check_tensor(q, at::kHalf, q, "q");
    TORCH_CHECK(q.dim() == 4, "q must be [batch, q_len, heads, head_dim], got ", q.sizes());
    const int64_t batch = q.size(0), q_len = q.size(1), q_heads = q.size(2), head_dim = q.size(3);
    ext::check_tensor(k_pages, at::kHalf, q, "k_pages");
    ext::check_tensor(v_pages, at::kHalf, q, "v_pages");
    TORCH_CHECK(k_pages.dim() == 4 && k_pages.sizes() == v_pages.sizes() && k_pages.size(3) == head_dim,
                "k_pages and v_pages must be equal [pages, page_size, kv_heads, ", head_dim, "], got ",
                k_pages.sizes(), " and ", v_pages.sizes());
    const int64_t page_size = k_pages.size(1), kv_heads = k_pages.size(2);
    ext::check_tensor(k_new, at::kHalf, q, "k_new");
    ext::check_tensor(v_new, at::kHalf, q, "v_new");
    const std::vector<int64_t> kv_shape{batch, q_len, kv_heads, head_dim};
    TORCH_CHECK(k_new.sizes() == kv_shape && v_new.sizes() == kv_shape, "k_new and v_new must be ", kv_shape,
                ", got ", k_new.sizes(), " and ", v_new.sizes());
    TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "query heads ", q_heads,
                " must be a multiple of key/value heads ", kv_heads);
    TORCH_CHECK(head_dim % 8 == 0 && head_dim <= PAGED_ATTN_MAX_HEAD_DIM, "head_dim ", head_dim,
                " must be a multiple of 8 and at most ", PAGED_ATTN_MAX_HEAD_DIM, " for the paged kernel");
    ext::check_aligned(k_pages, 16, "k_pages");
    ext::check_aligned(v_pages, 16, "v_pages");
    // new keys/values are copied 16 bytes at a time; realign a view that starts at an odd offset
    const auto aligned = [](const at::Tensor& t) {
        return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
    };
    const at::Tensor k_in = aligned(k_new), v_in = aligned(v_new);
    const at::Tensor table = block_table.to(q.device(), at::kInt).contiguous();
    const at::Tensor seqlens = cache_seqlens.to(q.device(), at::kInt).contiguous();
    TORCH_CHECK(table.dim() == 2 && table.size(0) == batch && seqlens.numel() == batch,
                "block_table must be [", batch, ", pages] and cache_seqlens [", batch, "], got ", table.sizes(),
                " and ", seqlens.sizes());

    const c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = ext::stream_of(q);
    at::Tensor out = at::empty_like(q);
    PagedAttnArgs a{};
    a.q = ext::ptr<const half>(q);
    a.k_pages = ext::ptr<const half>(k_pages);
    a.v_pages = ext::ptr<const half>(v_pages);
    a.block_table = ext::ptr<const int32_t>(table);
    a.cache_seqlens = ext::ptr<const int32_t>(seqlens);
    a.out = ext::ptr<half>(out);
    a.batch = (int) batch;
    a.q_len = (int) q_len;
    a.q_heads = (int) q_heads;
    a.kv_heads = (int) kv_heads;
    a.head_dim = (int) head_dim;
    a.page_size = (int) page_size;
    a.pages_per_seq = (int) table.size(1);
    a.scale = (float) scale;
    a.softcap = (float) softcap;
    a.window = (int) window;

    ext::check_launch(paged_write_cuda(ext::ptr<const half>(k_in), ext::ptr<const half>(v_in), ext::ptr<half>(k_pages),
                                       ext::ptr<half>(v_pages), a.block_table, a.cache_seqlens, a.batch, a.q_len,
                                       a.kv_heads, a.head_dim, a.page_size, a.pages_per_seq, stream),
                      "paged_write");
    const int splits = paged_attn_splits(a, q.get_device());
    at::Tensor scratch = at::empty({paged_attn_scratch_floats(a, splits)}, q.options().dtype(at::kFloat));
    ext::check_launch(paged_attn_cuda(a, splits, ext::ptr<float>(scratch), stream), "paged_attention");
    return out;
}
