#include "rope.h"
#include "util.cuh"

namespace {

constexpr int ROPE_THREADS = 256;

// One block per token; threads walk the (head, pair) grid. out_a = a·c − b·s, out_b = b·c + a·s.
template <typename T>
__global__ void rope_kernel(half* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin,
                            const int64_t* __restrict__ positions, int heads, int head_dim, int rot,
                            int table_len, bool neox)
{
    const int64_t token = blockIdx.x;
    int64_t pos = positions[token];
    pos = pos < 0 ? 0 : (pos >= table_len ? table_len - 1 : pos);
    const T* c_row = cos + pos * rot;
    const T* s_row = sin + pos * rot;
    const int half_rot = rot / 2;
    half* xt = x + token * heads * head_dim;
    for (int idx = threadIdx.x; idx < heads * half_rot; idx += blockDim.x)
    {
        const int h = idx / half_rot;
        const int i = idx - h * half_rot;
        half* xh = xt + h * head_dim;
        const int ia = neox ? i : 2 * i;
        const int ib = neox ? i + half_rot : 2 * i + 1;
        const float c = to_float(c_row[i]);
        const float s = to_float(s_row[i]);
        const float a = __half2float(xh[ia]);
        const float b = __half2float(xh[ib]);
        xh[ia] = __float2half_rn(a * c - b * s);
        xh[ib] = __float2half_rn(b * c + a * s);
    }
}

}  // namespace

template <typename T>
cudaError_t rope_cuda(half* x, const T* cos, const T* sin, const int64_t* positions, int tokens, int heads,
                      int head_dim, int rot, int table_len, bool neox, cudaStream_t stream)
{
    if (tokens == 0) return cudaSuccess;
    rope_kernel<T><<<tokens, ROPE_THREADS, 0, stream>>>(x, cos, sin, positions, heads, head_dim, rot,
                                                        table_len, neox);
    return cudaGetLastError();
}

template cudaError_t rope_cuda<float>(half*, const float*, const float*, const int64_t*, int, int, int, int,
                                      int, bool, cudaStream_t);
template cudaError_t rope_cuda<half>(half*, const half*, const half*, const int64_t*, int, int, int, int,
                                     int, bool, cudaStream_t);
