#include "cache.h"
#include "util.cuh"

namespace {

constexpr int FP8_THREADS = 256;
constexpr int Q_WARPS = 8;          // one warp per 64-element chunk

// Flat token index of window position j of sequence b, or -1 when it lies outside the window.
__device__ __forceinline__ int64_t window_token(const TokenWindow& w, int b, int j)
{
    int lo = w.offset;
    if (w.seqlens && w.start_at_seqlen) lo += w.seqlens[b];
    int hi = lo + w.width;
    if (w.seqlens && w.end_at_seqlen) hi = min(hi, w.seqlens[b]);
    const int p = lo + j;
    if (p >= hi || p < 0) return -1;
    if (!w.block_table) return (int64_t) b * w.seq_len + p;
    const int page = p / w.page_size;
    if (page >= w.pages_per_seq) return -1;
    return (int64_t) w.block_table[(int64_t) b * w.pages_per_seq + page] * w.page_size + p % w.page_size;
}

// FP8 (E5M2 by truncation): the stored byte is the upper byte of the fp16 bit pattern.
__global__ void fp16_to_fp8_kernel(const half* __restrict__ src, uint8_t* __restrict__ dst, int feat, TokenWindow w)
{
    const int64_t t = window_token(w, blockIdx.z, blockIdx.x);
    const int e = (blockIdx.y * blockDim.x + threadIdx.x) * 2;
    if (t < 0 || e >= feat) return;
    const half2 v = *reinterpret_cast<const half2*>(src + t * feat + e);
    uchar2 out;
    out.x = (uint8_t) (__half_as_ushort(__low2half(v)) >> 8);
    out.y = (uint8_t) (__half_as_ushort(__high2half(v)) >> 8);
    *reinterpret_cast<uchar2*>(dst + t * feat + e) = out;
}

__global__ void fp8_to_fp16_kernel(const uint8_t* __restrict__ src, half* __restrict__ dst, int feat, TokenWindow w)
{
    const int64_t t = window_token(w, blockIdx.z, blockIdx.x);
    const int e = (blockIdx.y * blockDim.x + threadIdx.x) * 2;
    if (t < 0 || e >= feat) return;
    const uchar2 q = *reinterpret_cast<const uchar2*>(src + t * feat + e);
    *reinterpret_cast<half2*>(dst + t * feat + e) =
        __halves2half2(__ushort_as_half((unsigned short) (q.x << 8)), __ushort_as_half((unsigned short) (q.y << 8)));
}

// Unnormalised 32-point Walsh-Hadamard transform across the warp (Sylvester order): at stage m, lane i
// pairs with lane i^m; the lower lane keeps the sum, the upper one lower − upper.
__device__ __forceinline__ float hadamard32(float v, int lane)
{
    #pragma unroll
    for (int m = 1; m < 32; m <<= 1)
    {
        const float p = __shfl_xor_sync(FULL_MASK, v, m);
        v = (lane & m) ? __fsub_rn(p, v) : __fadd_rn(v, p);
    }
    return v;
}

// Warp per 64-element chunk: lane t holds elements 2t (a) and 2t+1 (b). Even and odd elements are rotated
// separately; rotated positions 0..31 (lanes 0..15) and 32..63 (lanes 16..31) each get one scale.
// Codes: q = clamp(rint(v · levels/absmax) + levels, 0, 2·levels − 1), levels = 2^(bits−1); scale = absmax/levels.
template <int BITS>
__global__ void fp16_to_q_kernel(const half* __restrict__ src, uint8_t* __restrict__ q, half* __restrict__ scales,
                                 int feat, int padded, TokenWindow w)
{
    const int64_t t = window_token(w, blockIdx.z, blockIdx.x);
    const int lane = threadIdx.x & 31;
    const int chunk = blockIdx.y * Q_WARPS + (threadIdx.x >> 5);
    if (t < 0 || chunk * 64 >= padded) return;            // uniform per warp

    const int e = chunk * 64 + 2 * lane;
    float a = 0.0f, b = 0.0f;
    if (e < feat)                                          // feat is even, so e + 1 < feat too
    {
        const half2 v = *reinterpret_cast<const half2*>(src + t * feat + e);
        a = __low2float(v);
        b = __high2float(v);
    }
    a = hadamard32(a, lane);
    b = hadamard32(b, lane);

    float m = fmaxf(fabsf(a), fabsf(b));
    #pragma unroll
    for (int s = 1; s < 16; s <<= 1) m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, s));

    constexpr float levels = (float) (1 << (BITS - 1));
    constexpr int max_code = (1 << BITS) - 1;
    const float inv = m > 0.0f ? __fdiv_rn(levels, m) : 0.0f;
    const int qa = min(max((int) rintf(__fmul_rn(a, inv)) + (1 << (BITS - 1)), 0), max_code);
    const int qb = min(max((int) rintf(__fmul_rn(b, inv)) + (1 << (BITS - 1)), 0), max_code);

    if ((lane & 15) == 0)
        scales[t * (padded / 32) + chunk * 2 + (lane >> 4)] = __float2half_rn(__fdiv_rn(m, levels));
    if (BITS == 4)
        q[t * (padded / 2) + chunk * 32 + lane] = (uint8_t) (qa | (qb << 4));
    else
        *reinterpret_cast<uchar2*>(q + t * padded + chunk * 64 + 2 * lane) = make_uchar2((uint8_t) qa, (uint8_t) qb);
}

// Inverse: v = (q − levels) · scale, the same butterfly, then × 1/32 (H·H = 32·I).
template <int BITS>
__global__ void q_to_fp16_kernel(const uint8_t* __restrict__ q, const half* __restrict__ scales, half* __restrict__ dst,
                                 int feat, int padded, TokenWindow w)
{
    const int64_t t = window_token(w, blockIdx.z, blockIdx.x);
    const int lane = threadIdx.x & 31;
    const int chunk = blockIdx.y * Q_WARPS + (threadIdx.x >> 5);
    if (t < 0 || chunk * 64 >= padded) return;

    int qa, qb;
    if (BITS == 4)
    {
        const uint8_t byte = q[t * (padded / 2) + chunk * 32 + lane];
        qa = byte & 15;
        qb = byte >> 4;
    }
    else
    {
        const uchar2 v = *reinterpret_cast<const uchar2*>(q + t * padded + chunk * 64 + 2 * lane);
        qa = v.x;
        qb = v.y;
    }
    const float scale = __half2float(scales[t * (padded / 32) + chunk * 2 + (lane >> 4)]);
    float a = __fmul_rn((float) (qa - (1 << (BITS - 1))), scale);
    float b = __fmul_rn((float) (qb - (1 << (BITS - 1))), scale);
    a = hadamard32(a, lane);
    b = hadamard32(b, lane);
    const int e = chunk * 64 + 2 * lane;
    if (e < feat)
        *reinterpret_cast<half2*>(dst + t * feat + e) =
            __floats2half2_rn(__fmul_rn(a, 1.0f / 32.0f), __fmul_rn(b, 1.0f / 32.0f));
}

// x: window position (up to 2^31 - 1), y: block of the token's elements, z: sequence.
dim3 window_grid(int token_blocks, const TokenWindow& w) { return dim3(w.width, token_blocks, w.batch); }

bool empty(const TokenWindow& w) { return w.width <= 0 || w.batch <= 0; }

}  // namespace

cudaError_t fp16_to_fp8_cuda(const half* src, uint8_t* dst, int feat, const TokenWindow& w, cudaStream_t stream)
{
    if (empty(w)) return cudaSuccess;
    const int blocks = (feat / 2 + FP8_THREADS - 1) / FP8_THREADS;
    fp16_to_fp8_kernel<<<window_grid(blocks, w), FP8_THREADS, 0, stream>>>(src, dst, feat, w);
    return cudaGetLastError();
}

cudaError_t fp8_to_fp16_cuda(const uint8_t* src, half* dst, int feat, const TokenWindow& w, cudaStream_t stream)
{
    if (empty(w)) return cudaSuccess;
    const int blocks = (feat / 2 + FP8_THREADS - 1) / FP8_THREADS;
    fp8_to_fp16_kernel<<<window_grid(blocks, w), FP8_THREADS, 0, stream>>>(src, dst, feat, w);
    return cudaGetLastError();
}

cudaError_t fp16_to_q_cuda(const half* src, uint8_t* q, half* scales, int feat, int padded, int bits,
                           const TokenWindow& w, cudaStream_t stream)
{
    if (empty(w)) return cudaSuccess;
    const dim3 grid = window_grid((padded / 64 + Q_WARPS - 1) / Q_WARPS, w);
    if (bits == 4) fp16_to_q_kernel<4><<<grid, Q_WARPS * 32, 0, stream>>>(src, q, scales, feat, padded, w);
    else if (bits == 8) fp16_to_q_kernel<8><<<grid, Q_WARPS * 32, 0, stream>>>(src, q, scales, feat, padded, w);
    else return cudaErrorInvalidValue;
    return cudaGetLastError();
}

cudaError_t q_to_fp16_cuda(const uint8_t* q, const half* scales, half* dst, int feat, int padded, int bits,
                           const TokenWindow& w, cudaStream_t stream)
{
    if (empty(w)) return cudaSuccess;
    const dim3 grid = window_grid((padded / 64 + Q_WARPS - 1) / Q_WARPS, w);
    if (bits == 4) q_to_fp16_kernel<4><<<grid, Q_WARPS * 32, 0, stream>>>(q, scales, dst, feat, padded, w);
    else if (bits == 8) q_to_fp16_kernel<8><<<grid, Q_WARPS * 32, 0, stream>>>(q, scales, dst, feat, padded, w);
    else return cudaErrorInvalidValue;
    return cudaGetLastError();
}
