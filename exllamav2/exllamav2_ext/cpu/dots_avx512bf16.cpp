// The kernels of bf16 operands for CPUs with AVX512-BF16, by vdpbf16ps: 32 products per instruction where the
// float32 path's FMA does 16 after widening every element.
//
// Decode attention over a bf16 cache: q . k takes the bf16 query as the activations gave it and the keys as cached
// (the scale multiplies the sum); p @ v pairs consecutive positions (one vdpbf16ps: positions s, s + 1 of 16 dims)
// with the probabilities rounded to bf16, as transformers' bf16 eager attention and torch's CPU flash attention
// round them. Softmax, prefetching, blocks and the task split are qkernel_impl.h's, on the AVX-512F traits with
// kDotBf16 set.
//
// bf16 weights times bf16 activations (the bf16 mode's 16-bit checkpoints at decode): the float path's one FMA
// chain per row moves 32 bytes of weight per FMA latency (~29 GB/s per core on Zen 4, below what one core reads);
// a dot product moves 64. The products of two bf16 are exact in float32, so only the order of the float32 sum
// (and denormal inputs, flushed) differs from the float path.

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "qkernel.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")

namespace exlcpu {
namespace avx512bf16 {
namespace dots {      // this file's instantiations of qkernel_impl.h, apart from kernels_avx512bf16.cpp's

#include "simd_avx512.h"

struct SD : S {
    static constexpr bool kDotBf16 = true;
};

#include "qkernel_impl.h"

using alias16 = uint16_t __attribute__((may_alias));    // the probabilities' bf16 written over their float32
using alias32 = uint32_t __attribute__((may_alias));

// 32 bf16 elements at p, or (Full false) the first 16 with zeros above: a head dim's last 16
template <bool Full>
EXL_INLINE __m512i load32(const uint16_t* p) {
    if constexpr (Full) return _mm512_loadu_si512(p);
    else return _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

EXL_INLINE __m512 dot(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

// sum of q[g] . k[s + i] over the dims for NG query heads (q[g] at q + g * D) and keys s .. s + NK - 1
template <int NG, int NK>
EXL_INLINE void key_dots(const uint16_t* q, int64_t D, const uint16_t* k, int64_t ks, int64_t s,
                         __m512 (&acc)[NG][NK]) {
    for (int g = 0; g < NG; ++g)
        for (int i = 0; i < NK; ++i) acc[g][i] = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 32 <= D; d += 32) {
        __m512i qv[NG];
        for (int g = 0; g < NG; ++g) qv[g] = load32<true>(q + g * D + d);
        for (int i = 0; i < NK; ++i) {
            const __m512i kv = load32<true>(k + (s + i) * ks + d);
            for (int g = 0; g < NG; ++g) acc[g][i] = dot(acc[g][i], qv[g], kv);
        }
    }
    if (d < D)
        for (int i = 0; i < NK; ++i) {
            const __m512i kv = load32<false>(k + (s + i) * ks + d);
            for (int g = 0; g < NG; ++g) acc[g][i] = dot(acc[g][i], load32<false>(q + g * D + d), kv);
        }
}

// sc[g * ld + s] = scale * q[g] . k[s] for keys s < n: four at a time, each head's four sums from one transposed sum
template <int NG>
void scores_dots(const uint16_t* q, int64_t D, const uint16_t* k, int64_t ks, int64_t n, float scale, float* sc,
                 int64_t ld) {
    int64_t s = 0;
    for (; s + 4 <= n; s += 4) {
        for (int i = 0; i < 4; ++i) prefetch_row<true>(k, s + i, ks, D);
        __m512 acc[NG][4];
        key_dots<NG, 4>(q, D, k, ks, s, acc);
        for (int g = 0; g < NG; ++g) {
            float out[4];
            S::hsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3], out);
            for (int i = 0; i < 4; ++i) sc[g * ld + s + i] = out[i] * scale;
        }
    }
    for (; s < n; ++s) {
        prefetch_row<true>(k, s, ks, D);
        __m512 acc[NG][1];
        key_dots<NG, 1>(q, D, k, ks, s, acc);
        for (int g = 0; g < NG; ++g) sc[g * ld + s] = _mm512_reduce_add_ps(acc[g][0]) * scale;
    }
}

// a row of ns float32 probabilities rounded to bf16 (nearest even) over its own first 2 ns bytes, a zero after an
// odd count (the last pair's second position): each write lands below the floats still to be read
void round_row(float* row, int64_t ns) {
    alias16* o = reinterpret_cast<alias16*>(row);
    int64_t s = 0;
    for (; s + 16 <= ns; s += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + s), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(row + s)));
    for (; s < ns; ++s) o[s] = float_to_elem<true>(row[s]);
    if (ns % 2) o[ns] = 0;
}

// out[d0 .. d0 + 32) += the sums of 16 dims that interleaved positions leave in lanes {0-3, 8-11} (lo) and
// {4-7, 12-15} (hi) of each 256 bits, back in dim order (Full false: the first 16 dims only)
template <bool Full>
EXL_INLINE void add_unpaired(__m512 lo, __m512 hi, float* out) {
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), _mm512_permutex2var_ps(lo, first, hi)));
    if constexpr (Full) {
        const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
        _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_loadu_ps(out + 16), _mm512_permutex2var_ps(lo, second, hi)));
    }
}

// out[g][d0 .. d0 + 32 CH) += sum_{s < n} p[g][s] v[s] for NG <= 4 query heads, p as bf16 pairs (row g at
// p + g * ldp; pair i: positions 2i, 2i + 1, the second zero past an odd n), CH chunks of 32 dims (Full false: one
// chunk of 16)
template <int NG, int CH, bool Full>
void values_dots(const alias32* p, int64_t ldp, int64_t n, const uint16_t* v, int64_t vs, int64_t d0, float* out,
                 int64_t D) {
    __m512 lo[NG][CH], hi[NG][CH];
    for (int g = 0; g < NG; ++g)
        for (int c = 0; c < CH; ++c) lo[g][c] = hi[g][c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < n; s += 2) {
        if (d0 == 0) {
            prefetch_row<true>(v, s, vs, D);
            prefetch_row<true>(v, s + 1, vs, D);
        }
        __m512i vl[CH], vh[CH];
        for (int c = 0; c < CH; ++c) {
            const __m512i a = load32<Full>(v + s * vs + d0 + 32 * c);
            const __m512i b = s + 1 < n ? load32<Full>(v + (s + 1) * vs + d0 + 32 * c) : _mm512_setzero_si512();
            vl[c] = _mm512_unpacklo_epi16(a, b);
            vh[c] = _mm512_unpackhi_epi16(a, b);
        }
        for (int g = 0; g < NG; ++g) {
            const __m512i pb = _mm512_set1_epi32(int(p[g * ldp + s / 2]));
            for (int c = 0; c < CH; ++c) {
                lo[g][c] = dot(lo[g][c], vl[c], pb);
                hi[g][c] = dot(hi[g][c], vh[c], pb);
            }
        }
    }
    for (int g = 0; g < NG; ++g)
        for (int c = 0; c < CH; ++c) add_unpaired<Full>(lo[g][c], hi[g][c], out + g * D + d0 + 32 * c);
}

// out[g][..] += p @ v of NG query heads over n keys: 64 dims per pass, then 32, then a last 16
template <int NG>
void values_heads_dots(const alias32* p, int64_t ldp, int64_t n, const uint16_t* v, int64_t vs, float* out,
                       int64_t D) {
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) values_dots<NG, 2, true>(p, ldp, n, v, vs, d0, out, D);
    if (d0 + 32 <= D) {
        values_dots<NG, 1, true>(p, ldp, n, v, vs, d0, out, D);
        d0 += 32;
    }
    if (d0 < D) values_dots<NG, 1, false>(p, ldp, n, v, vs, d0, out, D);
}

// f(s0, n, rows, std::integral_constant<int, NG>{}, h) for each block of n <= kKeyBlock positions from s0 of batch
// b's keys (or values: base, batch stride bs, row stride rs), each kv head j0 + j (rows: its elements at the
// block's first position) and its query heads h .. h + NG - 1 (query_groups)
template <class F>
EXL_INLINE void key_blocks(const AttnArgs& a, const void* base, int64_t bs, int64_t rs, int64_t b, int64_t j0,
                           int64_t nh, int64_t ns, F&& f) {
    for (int64_t s0 = 0; s0 < ns; s0 += kKeyBlock) {
        const int64_t n = ns - s0 < kKeyBlock ? ns - s0 : kKeyBlock;
        const auto* row = static_cast<const uint16_t*>(key_row<true>(a, base, bs, rs, b, j0, s0));
        query_groups(nh, a.Hq / a.Hkv, [&](int64_t j, auto ng, int64_t h) { f(s0, n, row + j * a.D, ng, h); });
    }
}

template <class S_>
void attn_span_dots(const AttnArgs& a, int64_t b, int64_t row, int64_t j0, int64_t nh, int64_t ns, float* out,
                    float* sc) {
    const int64_t G = a.Hq / a.Hkv, D = a.D, H = nh * G;
    const uint16_t* q = static_cast<const uint16_t*>(a.q) + row * a.qb + j0 * G * D;
    key_blocks(a, a.k, a.kb, a.ks, b, j0, nh, ns, [&](int64_t s0, int64_t n, const uint16_t* k, auto ng, int64_t h) {
        scores_dots<decltype(ng)::value>(q + h * D, D, k, a.ks, n, a.scale, sc + h * ns + s0, ns);
    });
    for (int64_t h = 0; h < H; ++h) {
        softmax_row<S_>(sc + h * ns, ns);
        round_row(sc + h * ns, ns);
    }
    for (int64_t i = 0; i < H * D; ++i) out[i] = 0.f;
    const auto* p = reinterpret_cast<const alias32*>(sc);     // row h's pairs at p + h * ns
    key_blocks(a, a.v, a.vb, a.vs, b, j0, nh, ns, [&](int64_t s0, int64_t n, const uint16_t* v, auto ng, int64_t h) {
        values_heads_dots<decltype(ng)::value>(p + h * ns + s0 / 2, ns, n, v, a.vs, out + h * D, D);
    });
}

// rows n0 .. n1 - 1 of y = x w^T, one output row at a time (one weight stream) for up to four activation rows, the
// K tail by masked loads (zeros add nothing). One accumulator per activation row: 64 bytes of weight per dot
// product's latency is about what one core reads from DRAM (Zen 4, 1 thread, 200 MB of layer-shaped weights:
// 29-30 GB/s by the float path, 33-35 by this one, two chains a row alike within the noise; 2 threads, bound by
// memory, alike).
template <int MR>
EXL_INLINE void bf16_row_dots(const uint16_t* x, int64_t K, const uint16_t* w, uint16_t* y, int64_t ldy) {
    __m512 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512i wv = _mm512_loadu_si512(w + k);
        for (int m = 0; m < MR; ++m) acc[m] = dot(acc[m], wv, _mm512_loadu_si512(x + m * K + k));
    }
    if (k < K) {
        const __mmask32 tail = _cvtu32_mask32((1u << (K - k)) - 1);
        const __m512i wv = _mm512_maskz_loadu_epi16(tail, w + k);
        for (int m = 0; m < MR; ++m) acc[m] = dot(acc[m], wv, _mm512_maskz_loadu_epi16(tail, x + m * K + k));
    }
    store_sums<SD, true, MR>(acc, y, ldy, [](int) { return 0.f; });
}

template <class S_>
void bf16_rows_dots(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t M, int64_t K, int64_t N, int64_t n0,
                    int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
        row_groups(M, [&](auto mr, int64_t m) {
            bf16_row_dots<decltype(mr)::value>(x + m * K, K, w + n * K, y + m * N + n, N);
        });
}

}  // namespace dots

void attn_decode_dots(const AttnArgs& a, int64_t t0, int64_t t1) { dots::attn_decode<dots::SD>(a, t0, t1); }

void bf16_gemv_dots(const void* x, bool xbf, const uint16_t* w, void* y, int64_t M, int64_t K, int64_t N, int64_t n0,
                    int64_t n1) {
    dots::f16_gemv<dots::SD, true>(x, xbf, w, y, M, K, N, n0, n1);
}

}  // namespace avx512bf16
}  // namespace exlcpu

#pragma GCC pop_options
