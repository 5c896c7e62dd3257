#include "q_matrix.h"
#include "util.cuh"

namespace {

constexpr int Q_COLS = 128;          // columns per block, one per thread
constexpr int GEMM_CHUNKS = 8;       // chunks (at most 256 stored rows) per GEMM block
constexpr int FINAL_THREADS = 256;

struct Chunk
{
    int row0, rows, bits, word0, group;
};

__device__ __forceinline__ Chunk load_chunk(const int32_t* chunks, int i)
{
    const int32_t* c = chunks + (int64_t) i * Q_CHUNK_FIELDS;
    return Chunk{c[0], c[1], c[2], c[3], c[4]};
}

// Scale and zero point of (group, column).
template <int FMT>
__device__ __forceinline__ void group_params(const QMatrixView& q, int g, int n, int bits, half& scale, int& zero)
{
    if constexpr (FMT == QFORMAT_EXL2)
    {
        const uint32_t s = (q.q_scale[(int64_t) g * (q.q_stride / 8) + n / 8] >> (4 * (n & 7))) & 15u;
        scale = __hmul(__int2half_rn((int) ((s + 1) * (s + 1))), q.scale_max[g]);
        zero = 1 << (bits - 1);
    }
    else
    {
        scale = q.scales[(int64_t) g * q.N + n];
        zero = (int) ((q.qzeros[(int64_t) g * (q.N / 8) + n / 8] >> (4 * (n & 7))) & 15u) + q.zero_offset;
    }
}

// The chunk's words for column n; words past the chunk's stream read as zero.
template <int B>
__device__ __forceinline__ void load_words(uint32_t (&w)[B], const QMatrixView& q, const Chunk& c, int n)
{
    const int nwords = (c.rows * B + 31) / 32;
    #pragma unroll
    for (int j = 0; j < B; j++)
        w[j] = j < nwords ? q.q_weight[(int64_t) (c.word0 + j) * q.q_stride + n] : 0u;
}

// Code of local row i (a compile-time constant once the caller's loop is unrolled).
template <int B>
__device__ __forceinline__ int code_at(const uint32_t (&w)[B], int i)
{
    const int bit = i * B;
    const int wi = bit >> 5;
    const int sh = bit & 31;
    uint32_t v = w[wi] >> sh;
    if (sh + B > 32) v |= w[wi + 1] << (32 - sh);
    return (int) (v & ((1u << B) - 1u));
}

template <int FMT, int B>
__device__ __forceinline__ void reconstruct_chunk(const QMatrixView& q, const Chunk& c, int n, half* out,
                                                  int col_start, int cols)
{
    uint32_t w[B];
    load_words<B>(w, q, c, n);
    half scale;
    int zero;
    group_params<FMT>(q, c.group, n, B, scale, zero);
    #pragma unroll
    for (int i = 0; i < 32; i++)
    {
        if (i < c.rows)
        {
            const int row = c.row0 + i;
            const int k = q.perm ? q.perm[row] : row;
            out[(int64_t) k * cols + (n - col_start)] = __hmul(__int2half_rn(code_at<B>(w, i) - zero), scale);
        }
    }
}

// grid (column blocks, chunks)
template <int FMT>
__global__ void reconstruct_kernel(QMatrixView q, half* __restrict__ out, int col_start, int cols)
{
    const int n = col_start + blockIdx.x * Q_COLS + threadIdx.x;
    if (n >= col_start + cols) return;
    const Chunk c = load_chunk(q.chunks, blockIdx.y);
    if constexpr (FMT == QFORMAT_GPTQ)
    {
        reconstruct_chunk<FMT, 4>(q, c, n, out, col_start, cols);
    }
    else
    {
        switch (c.bits)
        {
            case 2: reconstruct_chunk<FMT, 2>(q, c, n, out, col_start, cols); break;
            case 3: reconstruct_chunk<FMT, 3>(q, c, n, out, col_start, cols); break;
            case 4: reconstruct_chunk<FMT, 4>(q, c, n, out, col_start, cols); break;
            case 5: reconstruct_chunk<FMT, 5>(q, c, n, out, col_start, cols); break;
            case 6: reconstruct_chunk<FMT, 6>(q, c, n, out, col_start, cols); break;
            case 8: reconstruct_chunk<FMT, 8>(q, c, n, out, col_start, cols); break;
        }
    }
}

// total[m] += scale · Σ_i (code_i − zero) · x[m, row0 + i]; xs points at the chunk's first row in shared memory.
template <int FMT, int B, int MT>
__device__ __forceinline__ void dot_chunk(const QMatrixView& q, const Chunk& c, int n, const float (*xs)[MT],
                                          float (&total)[MT])
{
    uint32_t w[B];
    load_words<B>(w, q, c, n);
    half scale;
    int zero;
    group_params<FMT>(q, c.group, n, B, scale, zero);
    float d[MT];
    #pragma unroll
    for (int m = 0; m < MT; m++) d[m] = 0.0f;
    #pragma unroll
    for (int i = 0; i < 32; i++)
    {
        if (i < c.rows)
        {
            const float wv = (float) (code_at<B>(w, i) - zero);
            #pragma unroll
            for (int m = 0; m < MT; m++) d[m] = fmaf(wv, xs[i][m], d[m]);
        }
    }
    const float s = __half2float(scale);
    #pragma unroll
    for (int m = 0; m < MT; m++) total[m] = fmaf(d[m], s, total[m]);
}

// grid (column blocks, chunk groups of GEMM_CHUNKS, row tiles of MT). Each block gathers its rows of x (through
// perm) into shared memory, each thread decodes its column, and partial sums meet in acc by atomicAdd.
template <int FMT, int MT>
__global__ void gemm_kernel(QMatrixView q, const half* __restrict__ x, int M, int x_stride, float* __restrict__ acc)
{
    __shared__ float xs[GEMM_CHUNKS * 32][MT];
    const int c_begin = blockIdx.y * GEMM_CHUNKS;
    const int c_end = min(c_begin + GEMM_CHUNKS, q.num_chunks);
    const int m0 = blockIdx.z * MT;
    const int row_begin = load_chunk(q.chunks, c_begin).row0;
    const Chunk last = load_chunk(q.chunks, c_end - 1);
    const int rows = last.row0 + last.rows - row_begin;

    for (int idx = threadIdx.x; idx < rows * MT; idx += blockDim.x)
    {
        const int r = idx / MT;
        const int m = idx - r * MT;
        const int k = q.perm ? q.perm[row_begin + r] : row_begin + r;
        xs[r][m] = m0 + m < M ? __half2float(x[(int64_t) (m0 + m) * x_stride + k]) : 0.0f;
    }
    __syncthreads();

    const int n = blockIdx.x * Q_COLS + threadIdx.x;
    if (n >= q.N) return;
    float total[MT];
    #pragma unroll
    for (int m = 0; m < MT; m++) total[m] = 0.0f;

    for (int ci = c_begin; ci < c_end; ci++)
    {
        const Chunk c = load_chunk(q.chunks, ci);
        const float (*xc)[MT] = xs + (c.row0 - row_begin);
        if constexpr (FMT == QFORMAT_GPTQ)
        {
            dot_chunk<FMT, 4, MT>(q, c, n, xc, total);
        }
        else
        {
            switch (c.bits)
            {
                case 2: dot_chunk<FMT, 2, MT>(q, c, n, xc, total); break;
                case 3: dot_chunk<FMT, 3, MT>(q, c, n, xc, total); break;
                case 4: dot_chunk<FMT, 4, MT>(q, c, n, xc, total); break;
                case 5: dot_chunk<FMT, 5, MT>(q, c, n, xc, total); break;
                case 6: dot_chunk<FMT, 6, MT>(q, c, n, xc, total); break;
                case 8: dot_chunk<FMT, 8, MT>(q, c, n, xc, total); break;
            }
        }
    }
    #pragma unroll
    for (int m = 0; m < MT; m++)
        if (m0 + m < M) atomicAdd(acc + (int64_t) (m0 + m) * q.N + n, total[m]);
}

__global__ void finalize_kernel(const float* __restrict__ acc, const half* __restrict__ bias, half* __restrict__ y,
                                int64_t count, int N)
{
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    float v = acc[i];
    if (bias) v += __half2float(bias[i % N]);
    y[i] = __float2half_rn(v);
}

template <int FMT>
cudaError_t launch_reconstruct(const QMatrixView& q, half* out, int col_start, int cols, cudaStream_t stream)
{
    const dim3 grid((cols + Q_COLS - 1) / Q_COLS, q.num_chunks);
    reconstruct_kernel<FMT><<<grid, Q_COLS, 0, stream>>>(q, out, col_start, cols);
    return cudaGetLastError();
}

template <int FMT, int MT>
cudaError_t launch_gemm(const QMatrixView& q, const half* x, int M, int x_stride, float* acc, cudaStream_t stream)
{
    const dim3 grid((q.N + Q_COLS - 1) / Q_COLS, (q.num_chunks + GEMM_CHUNKS - 1) / GEMM_CHUNKS, (M + MT - 1) / MT);
    gemm_kernel<FMT, MT><<<grid, Q_COLS, 0, stream>>>(q, x, M, x_stride, acc);
    return cudaGetLastError();
}

template <int FMT>
cudaError_t launch_gemm_tiles(const QMatrixView& q, const half* x, int M, int x_stride, float* acc, cudaStream_t stream)
{
    if (M == 1) return launch_gemm<FMT, 1>(q, x, M, x_stride, acc, stream);
    if (M == 2) return launch_gemm<FMT, 2>(q, x, M, x_stride, acc, stream);
    if (M <= 4) return launch_gemm<FMT, 4>(q, x, M, x_stride, acc, stream);
    return launch_gemm<FMT, 8>(q, x, M, x_stride, acc, stream);
}

}  // namespace

cudaError_t q_reconstruct_cuda(const QMatrixView& q, half* out, int col_start, int cols, cudaStream_t stream)
{
    if (cols <= 0 || q.num_chunks == 0) return cudaSuccess;
    if (q.num_chunks > 65535) return cudaErrorInvalidValue;
    return q.format == QFORMAT_GPTQ ? launch_reconstruct<QFORMAT_GPTQ>(q, out, col_start, cols, stream)
                                    : launch_reconstruct<QFORMAT_EXL2>(q, out, col_start, cols, stream);
}

cudaError_t q_gemm_cuda(const QMatrixView& q, const half* x, int M, int x_stride, const half* bias, float* acc,
                        half* y, cudaStream_t stream)
{
    if (M == 0 || q.N == 0) return cudaSuccess;
    if (q.num_chunks > Q_MAX_GEMM_CHUNKS) return cudaErrorInvalidValue;
    const int64_t count = (int64_t) M * q.N;
    cudaError_t err = cudaMemsetAsync(acc, 0, count * sizeof(float), stream);
    if (err != cudaSuccess) return err;
    if (q.num_chunks > 0)
    {
        err = q.format == QFORMAT_GPTQ ? launch_gemm_tiles<QFORMAT_GPTQ>(q, x, M, x_stride, acc, stream)
                                       : launch_gemm_tiles<QFORMAT_EXL2>(q, x, M, x_stride, acc, stream);
        if (err != cudaSuccess) return err;
    }
    const int blocks = (int) ((count + FINAL_THREADS - 1) / FINAL_THREADS);
    finalize_kernel<<<blocks, FINAL_THREADS, 0, stream>>>(acc, bias, y, count, q.N);
    return cudaGetLastError();
}
