// The CPU kernels for AVX2 + FMA + F16C (the baseline every CPU kernel build targets): 16 lanes as two
// 256-bit vectors.

#include <immintrin.h>

#include <cstdint>
#include <utility>

#include "qkernel.h"

namespace exlcpu {
namespace avx2 {

struct S {
    struct I { __m256i lo, hi; };
    struct F { __m256 lo, hi; };

    static inline __attribute__((always_inline)) I load_i(const int32_t* p) {
        return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8))};
    }
    template <int n> static inline __attribute__((always_inline)) I srl(I v) {
        return {_mm256_srli_epi32(v.lo, n), _mm256_srli_epi32(v.hi, n)};
    }
    template <int n> static inline __attribute__((always_inline)) I sll(I v) {
        return {_mm256_slli_epi32(v.lo, n), _mm256_slli_epi32(v.hi, n)};
    }
    static inline __attribute__((always_inline)) I and_i(I v, int mask) {
        __m256i m = _mm256_set1_epi32(mask);
        return {_mm256_and_si256(v.lo, m), _mm256_and_si256(v.hi, m)};
    }
    static inline __attribute__((always_inline)) I or_i(I a, I b) { return {_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
    static inline __attribute__((always_inline)) I sub_i(I a, I b) { return {_mm256_sub_epi32(a.lo, b.lo), _mm256_sub_epi32(a.hi, b.hi)}; }
    static inline __attribute__((always_inline)) I set1_i(int v) { __m256i s = _mm256_set1_epi32(v); return {s, s}; }
    static inline __attribute__((always_inline)) I load_u8(const uint8_t* p) {
        __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return {_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))};
    }
    static inline __attribute__((always_inline)) F load_h(const uint16_t* p) {
        return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
    }
    static inline __attribute__((always_inline)) F magic(I v) {   // 2^23 + v for 0 <= v < 2^23
        __m256i m = _mm256_set1_epi32(0x4B000000);
        return {_mm256_castsi256_ps(_mm256_or_si256(v.lo, m)), _mm256_castsi256_ps(_mm256_or_si256(v.hi, m))};
    }
    static inline __attribute__((always_inline)) F set1_f(float v) { __m256 s = _mm256_set1_ps(v); return {s, s}; }
    static inline __attribute__((always_inline)) F sub(F a, F b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
    static inline __attribute__((always_inline)) F load_f(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
    static inline __attribute__((always_inline)) F to_f(I v) { return {_mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi)}; }
    static inline __attribute__((always_inline)) F mul(F a, F b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
    static inline __attribute__((always_inline)) F add(F a, F b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
    static inline __attribute__((always_inline)) F round_h(F v) {
        constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        return {_mm256_cvtph_ps(_mm256_cvtps_ph(v.lo, mode)), _mm256_cvtph_ps(_mm256_cvtps_ph(v.hi, mode))};
    }
    static inline __attribute__((always_inline)) F fma(F w, float x, F acc) {
        __m256 b = _mm256_set1_ps(x);
        return {_mm256_fmadd_ps(w.lo, b, acc.lo), _mm256_fmadd_ps(w.hi, b, acc.hi)};
    }
    static inline __attribute__((always_inline)) F fmav(F a, F b, F acc) {
        return {_mm256_fmadd_ps(a.lo, b.lo, acc.lo), _mm256_fmadd_ps(a.hi, b.hi, acc.hi)};
    }
    static inline __attribute__((always_inline)) F zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
    static inline __attribute__((always_inline)) void store(float* p, F v) { _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }
    static inline __attribute__((always_inline)) float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
    // the four sums of a, b, c, d into out[0..3]: pairwise adds interleave the rows, no per-row reduction
    static inline __attribute__((always_inline)) void hsum4(F a, F b, F c, F d, float* out) {
        __m256 ab = _mm256_hadd_ps(_mm256_add_ps(a.lo, a.hi), _mm256_add_ps(b.lo, b.hi));
        __m256 cd = _mm256_hadd_ps(_mm256_add_ps(c.lo, c.hi), _mm256_add_ps(d.lo, d.hi));
        __m256 abcd = _mm256_hadd_ps(ab, cd);   // per 128-bit half: a, b, c, d partial sums
        _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
    }
};

#include "qkernel_impl.h"

}  // namespace avx2

const Kernels& kernels_avx2() {
    static const Kernels k{"avx2", &avx2::q_gemv<avx2::S>, &avx2::q_dequant<avx2::S>, &avx2::f16_gemv<avx2::S>};
    return k;
}

}  // namespace exlcpu
