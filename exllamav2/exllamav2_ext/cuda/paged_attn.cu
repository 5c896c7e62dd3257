#include "paged_attn.h"
#include "util.cuh"

#include <math.h>

namespace {

constexpr int ATTN_THREADS = 128;
constexpr int ATTN_WARPS = ATTN_THREADS / 32;
constexpr int ATTN_ROWS = 16;                       // query rows (head × position) per block
constexpr int ROWS_PER_WARP = ATTN_ROWS / ATTN_WARPS;
constexpr int ATTN_TILE = 32;                       // keys per tile: one per lane when scoring
constexpr int MAX_SPLITS = 64;
constexpr int WRITE_THREADS = 128;

__device__ __forceinline__ int64_t page_slot(const int32_t* block_table, int pages_per_seq, int page_size, int b, int p)
{
    return (int64_t) block_table[(int64_t) b * pages_per_seq + p / page_size] * page_size + p % page_size;
}

// grid (batch * q_len): copy one token's keys and values into its page slot, 16 bytes at a time.
__global__ void paged_write_kernel(const half* __restrict__ k_new, const half* __restrict__ v_new, half* k_pages,
                                   half* v_pages, const int32_t* __restrict__ block_table,
                                   const int32_t* __restrict__ cache_seqlens, int q_len, int row, int page_size,
                                   int pages_per_seq)
{
    const int b = blockIdx.x / q_len;
    const int p = cache_seqlens[b] + blockIdx.x % q_len;
    if (p / page_size >= pages_per_seq) return;
    const int64_t dst = page_slot(block_table, pages_per_seq, page_size, b, p) * row;
    const int64_t src = (int64_t) blockIdx.x * row;
    for (int e = threadIdx.x * 8; e < row; e += blockDim.x * 8)
    {
        *reinterpret_cast<uint4*>(k_pages + dst + e) = *reinterpret_cast<const uint4*>(k_new + src + e);
        *reinterpret_cast<uint4*>(v_pages + dst + e) = *reinterpret_cast<const uint4*>(v_new + src + e);
    }
}

// Keys [j0, j0 + ATTN_TILE) of head h into tile [ATTN_TILE][D + 2] (the +2 pad spreads rows over the banks);
// keys outside [j0, hi) are zero so that they contribute nothing.
__device__ __forceinline__ void load_tile(half* tile, const half* pages, const PagedAttnArgs& a, int b, int h,
                                          int j0, int hi)
{
    const int D = a.head_dim;
    const int vecs = D / 8;
    for (int idx = threadIdx.x; idx < ATTN_TILE * vecs; idx += ATTN_THREADS)
    {
        const int jj = idx / vecs;
        const int v = idx - jj * vecs;
        const int j = j0 + jj;
        uint4 data = make_uint4(0, 0, 0, 0);
        if (j < hi)
        {
            const int64_t slot = page_slot(a.block_table, a.pages_per_seq, a.page_size, b, j);
            data = *reinterpret_cast<const uint4*>(pages + (slot * a.kv_heads + h) * D + v * 8);
        }
        half2* dst = reinterpret_cast<half2*>(tile + jj * (D + 2) + v * 8);
        const half2* src = reinterpret_cast<const half2*>(&data);
        #pragma unroll
        for (int u = 0; u < 4; u++) dst[u] = src[u];
    }
}

// grid (splits, kv_heads * row_groups, batch). A block takes up to ATTN_ROWS query rows of one kv head
// (row r = position i * G + head g within the GQA group) and one split of their key range, keeps an online
// softmax per row, and writes unnormalised partial outputs with their running max and sum.
__global__ void __launch_bounds__(ATTN_THREADS)
paged_attn_kernel(PagedAttnArgs a, int splits, float* __restrict__ part_o, float* __restrict__ part_ml)
{
    extern __shared__ float smem[];
    const int D = a.head_dim;
    float* qs = smem;                                   // [ATTN_ROWS][D], pre-scaled
    float* ps = qs + ATTN_ROWS * D;                     // [ATTN_ROWS][ATTN_TILE] probabilities of the tile
    float* alpha = ps + ATTN_ROWS * ATTN_TILE;          // [ATTN_ROWS] rescale of the running output
    half* tile = reinterpret_cast<half*>(alpha + ATTN_ROWS);

    const int G = a.q_heads / a.kv_heads;
    const int R = G * a.q_len;
    const int row_groups = (R + ATTN_ROWS - 1) / ATTN_ROWS;
    const int b = blockIdx.z;
    const int h = blockIdx.y / row_groups;
    const int r0 = (blockIdx.y % row_groups) * ATTN_ROWS;
    const int nrows = min(ATTN_ROWS, R - r0);
    const int split = blockIdx.x;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;

    const int seqlen = a.cache_seqlens[b];
    const int p_first = seqlen + r0 / G;
    const int p_last = seqlen + (r0 + nrows - 1) / G;
    const int lo = a.window > 0 ? max(0, p_first - a.window + 1) : 0;
    // positions past the block table's capacity have no page (paged_write skipped them): never look them up
    const int hi = min(p_last + 1, a.pages_per_seq * a.page_size);
    const int tiles = hi > lo ? (hi - lo + ATTN_TILE - 1) / ATTN_TILE : 0;
    const int per_split = (tiles + splits - 1) / splits;
    const int t_begin = split * per_split;
    const int t_end = min(t_begin + per_split, tiles);

    for (int idx = threadIdx.x; idx < nrows * D; idx += ATTN_THREADS)
    {
        const int r = idx / D;
        const int d = idx - r * D;
        const int i = (r0 + r) / G;
        const int hq = h * G + (r0 + r) % G;
        qs[idx] = __half2float(a.q[(((int64_t) b * a.q_len + i) * a.q_heads + hq) * D + d]) * a.scale;
    }

    float m_run[ROWS_PER_WARP], l_run[ROWS_PER_WARP];
    #pragma unroll
    for (int rr = 0; rr < ROWS_PER_WARP; rr++)
    {
        m_run[rr] = -INFINITY;
        l_run[rr] = 0.0f;
    }
    float o[ATTN_ROWS][2];
    #pragma unroll
    for (int r = 0; r < ATTN_ROWS; r++) o[r][0] = o[r][1] = 0.0f;
    const int d2 = 2 * threadIdx.x;                     // this thread's output dims d2, d2 + 1

    for (int t = t_begin; t < t_end; t++)
    {
        const int j0 = lo + t * ATTN_TILE;
        __syncthreads();                                // previous tile fully consumed (and qs written)
        load_tile(tile, a.k_pages, a, b, h, j0, hi);
        __syncthreads();

        // scores: lane = key, warp = rows warp, warp + 4, ...
        float sc[ROWS_PER_WARP];
        #pragma unroll
        for (int rr = 0; rr < ROWS_PER_WARP; rr++) sc[rr] = 0.0f;
        const half2* krow = reinterpret_cast<const half2*>(tile + lane * (D + 2));
        for (int d = 0; d < D / 2; d++)
        {
            const float2 k = __half22float2(krow[d]);
            #pragma unroll
            for (int rr = 0; rr < ROWS_PER_WARP; rr++)
            {
                const int r = warp + rr * ATTN_WARPS;
                if (r < nrows) sc[rr] += qs[r * D + 2 * d] * k.x + qs[r * D + 2 * d + 1] * k.y;
            }
        }
        const int j = j0 + lane;
        #pragma unroll
        for (int rr = 0; rr < ROWS_PER_WARP; rr++)
        {
            const int r = warp + rr * ATTN_WARPS;
            if (r >= nrows) continue;                   // uniform across the warp
            const int p = seqlen + (r0 + r) / G;
            float s = sc[rr];
            if (a.softcap > 0.0f) s = a.softcap * tanhf(s / a.softcap);
            const bool visible = j < hi && j <= p && (a.window <= 0 || p - j < a.window);
            s = visible ? s : -INFINITY;
            const float m_new = fmaxf(m_run[rr], warp_max(s));
            const float pe = m_new == -INFINITY ? 0.0f : expf(s - m_new);
            const float al = m_new == -INFINITY ? 1.0f : expf(m_run[rr] - m_new);
            l_run[rr] = l_run[rr] * al + warp_sum(pe);
            m_run[rr] = m_new;
            ps[r * ATTN_TILE + lane] = pe;
            if (lane == 0) alpha[r] = al;
        }
        __syncthreads();                                // K no longer needed; ps and alpha ready
        load_tile(tile, a.v_pages, a, b, h, j0, hi);
        __syncthreads();

        if (d2 < D)
        {
            #pragma unroll
            for (int r = 0; r < ATTN_ROWS; r++)
            {
                if (r < nrows)
                {
                    o[r][0] *= alpha[r];
                    o[r][1] *= alpha[r];
                }
            }
            for (int jj = 0; jj < ATTN_TILE; jj++)
            {
                const float2 v = __half22float2(*reinterpret_cast<const half2*>(tile + jj * (D + 2) + d2));
                #pragma unroll
                for (int r = 0; r < ATTN_ROWS; r++)
                {
                    if (r < nrows)
                    {
                        const float p = ps[r * ATTN_TILE + jj];
                        o[r][0] += p * v.x;
                        o[r][1] += p * v.y;
                    }
                }
            }
        }
    }

    // partial index of row r: (output row) * splits + split, output row = (b * q_len + i) * q_heads + hq
    #pragma unroll
    for (int r = 0; r < ATTN_ROWS; r++)
    {
        if (r >= nrows) break;
        const int i = (r0 + r) / G;
        const int hq = h * G + (r0 + r) % G;
        const int64_t part = (((int64_t) b * a.q_len + i) * a.q_heads + hq) * splits + split;
        if (d2 < D)
        {
            part_o[part * D + d2] = o[r][0];
            part_o[part * D + d2 + 1] = o[r][1];
        }
        if (lane == 0 && warp == r % ATTN_WARPS)
        {
            part_ml[part * 2] = m_run[r / ATTN_WARPS];
            part_ml[part * 2 + 1] = l_run[r / ATTN_WARPS];
        }
    }
}

// grid (output rows): out = Σ_s e^(m_s − M) o_s / Σ_s e^(m_s − M) l_s; a row that saw no key gets zeros.
__global__ void paged_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                     half* __restrict__ out, int splits, int D)
{
    const int64_t row = blockIdx.x;
    const float* ml = part_ml + row * splits * 2;
    float M = -INFINITY;
    for (int s = 0; s < splits; s++)
        if (ml[2 * s + 1] > 0.0f) M = fmaxf(M, ml[2 * s]);
    float L = 0.0f;
    for (int s = 0; s < splits; s++)
        if (ml[2 * s + 1] > 0.0f) L += expf(ml[2 * s] - M) * ml[2 * s + 1];
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    for (int d = threadIdx.x; d < D; d += blockDim.x)
    {
        float acc = 0.0f;
        for (int s = 0; s < splits; s++)
            if (ml[2 * s + 1] > 0.0f) acc += expf(ml[2 * s] - M) * part_o[(row * splits + s) * D + d];
        out[row * D + d] = __float2half_rn(acc * inv);
    }
}

int row_groups(const PagedAttnArgs& a)
{
    return (a.q_heads / a.kv_heads * a.q_len + ATTN_ROWS - 1) / ATTN_ROWS;
}

size_t attn_smem_bytes(int D)
{
    return (ATTN_ROWS * D + ATTN_ROWS * ATTN_TILE + ATTN_ROWS) * sizeof(float) + ATTN_TILE * (D + 2) * sizeof(half);
}

}  // namespace

cudaError_t paged_write_cuda(const half* k_new, const half* v_new, half* k_pages, half* v_pages,
                             const int32_t* block_table, const int32_t* cache_seqlens, int batch, int q_len,
                             int kv_heads, int head_dim, int page_size, int pages_per_seq, cudaStream_t stream)
{
    if (batch * q_len == 0) return cudaSuccess;
    paged_write_kernel<<<batch * q_len, WRITE_THREADS, 0, stream>>>(
        k_new, v_new, k_pages, v_pages, block_table, cache_seqlens, q_len, kv_heads * head_dim, page_size,
        pages_per_seq);
    return cudaGetLastError();
}

// Enough blocks for about two waves: the grid without splits has batch · kv_heads · row_groups blocks. The key
// range is unknown on the host (no sync), so the block table's capacity bounds the useful splits.
int paged_attn_splits(const PagedAttnArgs& a, int device)
{
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 1;
    const int base = a.batch * a.kv_heads * row_groups(a);
    if (base <= 0) return 1;                            // nothing to launch (no queries); avoid dividing by 0
    const int capacity_tiles = (a.pages_per_seq * a.page_size + ATTN_TILE - 1) / ATTN_TILE;
    int splits = (2 * sms + base - 1) / base;
    splits = min(splits, min(capacity_tiles, MAX_SPLITS));
    return max(splits, 1);
}

int64_t paged_attn_scratch_floats(const PagedAttnArgs& a, int splits)
{
    return (int64_t) a.batch * a.q_len * a.q_heads * splits * (a.head_dim + 2);
}

cudaError_t paged_attn_cuda(const PagedAttnArgs& a, int splits, float* scratch, cudaStream_t stream)
{
    if (a.batch * a.q_len == 0) return cudaSuccess;
    if (a.head_dim > PAGED_ATTN_MAX_HEAD_DIM || a.head_dim % 8 || a.q_heads % a.kv_heads) return cudaErrorInvalidValue;
    const int64_t rows = (int64_t) a.batch * a.q_len * a.q_heads;
    float* part_o = scratch;
    float* part_ml = scratch + rows * splits * a.head_dim;
    const dim3 grid(splits, a.kv_heads * row_groups(a), a.batch);
    paged_attn_kernel<<<grid, ATTN_THREADS, attn_smem_bytes(a.head_dim), stream>>>(a, splits, part_o, part_ml);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    paged_combine_kernel<<<(unsigned) rows, 128, 0, stream>>>(part_o, part_ml, a.out, splits, a.head_dim);
    return cudaGetLastError();
}
