// The CPU kernels for AVX-512F: 16 lanes in one vector. Only this file is compiled for AVX-512 (by the
// target pragma below, not a command-line flag), and its code runs only where the CPU reports AVX-512F
// (chosen at run time in cpu_ext.cpp), so the library still loads and runs on AVX2-only CPUs.

#include <immintrin.h>

#include <cstdint>
#include <utility>

#include "qkernel.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")

namespace exlcpu {
namespace avx512 {

struct S {
    using I = __m512i;
    using F = __m512;

    static inline __attribute__((always_inline)) I load_i(const int32_t* p) { return _mm512_loadu_si512(p); }
    template <int n> static inline __attribute__((always_inline)) I srl(I v) { return _mm512_srli_epi32(v, n); }
    template <int n> static inline __attribute__((always_inline)) I sll(I v) { return _mm512_slli_epi32(v, n); }
    static inline __attribute__((always_inline)) I and_i(I v, int mask) {
        return _mm512_and_si512(v, _mm512_set1_epi32(mask));
    }
    static inline __attribute__((always_inline)) I or_i(I a, I b) { return _mm512_or_si512(a, b); }
    static inline __attribute__((always_inline)) I sub_i(I a, I b) { return _mm512_sub_epi32(a, b); }
    static inline __attribute__((always_inline)) I set1_i(int v) { return _mm512_set1_epi32(v); }
    static inline __attribute__((always_inline)) I load_u8(const uint8_t* p) {
        return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static inline __attribute__((always_inline)) F load_h(const uint16_t* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static inline __attribute__((always_inline)) F magic(I v) {   // 2^23 + v for 0 <= v < 2^23
        return _mm512_castsi512_ps(_mm512_or_si512(v, _mm512_set1_epi32(0x4B000000)));
    }
    static inline __attribute__((always_inline)) F set1_f(float v) { return _mm512_set1_ps(v); }
    static inline __attribute__((always_inline)) F sub(F a, F b) { return _mm512_sub_ps(a, b); }
    static inline __attribute__((always_inline)) F load_f(const float* p) { return _mm512_loadu_ps(p); }
    static inline __attribute__((always_inline)) F to_f(I v) { return _mm512_cvtepi32_ps(v); }
    static inline __attribute__((always_inline)) F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static inline __attribute__((always_inline)) F add(F a, F b) { return _mm512_add_ps(a, b); }
    static inline __attribute__((always_inline)) F round_h(F v) {
        return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    static inline __attribute__((always_inline)) F fma(F w, float x, F acc) {
        return _mm512_fmadd_ps(w, _mm512_set1_ps(x), acc);
    }
    static inline __attribute__((always_inline)) F fmav(F a, F b, F acc) { return _mm512_fmadd_ps(a, b, acc); }
    static inline __attribute__((always_inline)) F zero() { return _mm512_setzero_ps(); }
    static inline __attribute__((always_inline)) void store(float* p, F v) { _mm512_storeu_ps(p, v); }
    static inline __attribute__((always_inline)) float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
    static inline __attribute__((always_inline)) __m256 hi8(F v) {
        return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    }
    static inline __attribute__((always_inline)) void hsum4(F a, F b, F c, F d, float* out) {
        // fold 512 -> 256 bits, then the AVX2 transposed sum
        __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), hi8(a));
        __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), hi8(b));
        __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), hi8(c));
        __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), hi8(d));
        __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a8, b8), _mm256_hadd_ps(c8, d8));
        _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
    }
};

#include "qkernel_impl.h"

}  // namespace avx512
}  // namespace exlcpu

#pragma GCC pop_options

namespace exlcpu {

const Kernels& kernels_avx512() {
    static const Kernels k{"avx512", &avx512::q_gemv<avx512::S>, &avx512::q_dequant<avx512::S>,
                           &avx512::f16_gemv<avx512::S>};
    return k;
}

}  // namespace exlcpu
