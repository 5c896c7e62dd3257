// The CPU kernels for AVX2 + FMA + F16C (the baseline every CPU kernel build targets): 16 lanes as two
// 256-bit vectors.

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "qkernel.h"

namespace exlcpu {
namespace avx2 {

struct S {
    struct I { __m256i lo, hi; };     // lanes 0-7 and 8-15: rows 0-7 and 8-15 of a chunk half
    struct F { __m256 lo, hi; };
    using A = __m256;                 // a column's partial sums: both halves' products go to one accumulator
    static constexpr int kAccRegs = 8;    // of 16 registers
    static constexpr int kLutBits = 4;    // vpermps reaches 8 entries; 4-bit codes take two and a blend
    static constexpr bool kHalvesTogether = false;   // the order of a chunk's steps (ChunkFma)
    static constexpr bool kDotBf16 = false;          // bf16 attention by vdpbf16ps (attn_span_dots)

    static inline __attribute__((always_inline)) I load_i(const int32_t* p) {
        return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8))};
    }
    template <int n> static inline __attribute__((always_inline)) I srl(I v) {
        if constexpr (n == 0) return v; else return {_mm256_srli_epi32(v.lo, n), _mm256_srli_epi32(v.hi, n)};
    }
    template <int n> static inline __attribute__((always_inline)) I sll(I v) {
        return {_mm256_slli_epi32(v.lo, n), _mm256_slli_epi32(v.hi, n)};
    }
    static inline __attribute__((always_inline)) I or_i(I a, I b) { return {_mm256_or_si256(a.lo, b.lo), _mm256_or_si256(a.hi, b.hi)}; }
    static inline __attribute__((always_inline)) __m256 round_h(__m256 v) {
        return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    // (2^23 + zero) .. (2^23 + 2^bits - 1 - zero): 2^23 + code as a float, minus 2^23 + zero, is code - zero
    static inline __attribute__((always_inline)) __m256 code_minus_zero(__m256i c, __m256 mz) {
        return _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(c, _mm256_set1_epi32(0x4B000000))), mz);
    }
    template <int B>
    static inline __attribute__((always_inline)) __m256 decode8(__m256i c, const float* lut, __m256 s, __m256 mz) {
        if constexpr (B <= 3) {
            return _mm256_permutevar8x32_ps(_mm256_load_ps(lut), c);      // reads the low 3 bits only
        } else if constexpr (B == 4) {
            // entries 0-7 and 8-15, chosen by the code's bit 3 moved to the sign bit
            return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_load_ps(lut), c),
                                    _mm256_permutevar8x32_ps(_mm256_load_ps(lut + 8), c),
                                    _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
        } else {
            return round_h(_mm256_mul_ps(code_minus_zero(c, mz), s));
        }
    }
    // codes -> weights (see kernels_avx512.cpp); Exact: no bits above the code; Z: zero points in mz
    template <int B, bool Exact, bool Z>
    static inline __attribute__((always_inline)) F decode(I c, const float* lut, const float* s, const float* mz) {
        if constexpr (B > kLutBits && !Exact) {
            const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
            c = {_mm256_and_si256(c.lo, mask), _mm256_and_si256(c.hi, mask)};
        }
        if constexpr (B > kLutBits) {
            const __m256 sv = _mm256_set1_ps(*s), mzv = _mm256_set1_ps(Z ? *mz : 8388608.f + (1 << (B - 1)));
            return {decode8<B>(c.lo, lut, sv, mzv), decode8<B>(c.hi, lut, sv, mzv)};
        } else {
            return {decode8<B>(c.lo, lut, _mm256_setzero_ps(), _mm256_setzero_ps()),
                    decode8<B>(c.hi, lut, _mm256_setzero_ps(), _mm256_setzero_ps())};
        }
    }
    static inline __attribute__((always_inline)) void build_lut(int bits, const float* s, const float* mz, float* lut) {
        const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
        for (int h = 0; h < 2; ++h) {
            __m256i iota = _mm256_setr_epi32(8 * h, 8 * h + 1, 8 * h + 2, 8 * h + 3, 8 * h + 4, 8 * h + 5, 8 * h + 6, 8 * h + 7);
            __m256 c = code_minus_zero(_mm256_and_si256(iota, mask), _mm256_set1_ps(*mz));
            _mm256_store_ps(lut + 8 * h, round_h(_mm256_mul_ps(c, _mm256_set1_ps(*s))));
        }
    }
    // s[j] = scale, mz[j] = 2^23 + zero of the block's 16 columns (zero 2^(bits-1) without zero points)
    static inline __attribute__((always_inline)) void scales(const uint16_t* sc, const uint8_t* zr, int bits,
                                                             float* s, float* mz) {
        __m256i z0 = _mm256_set1_epi32(1 << (bits - 1)), z1 = z0;
        if (zr) {
            __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(zr));
            z0 = _mm256_cvtepu8_epi32(b);
            z1 = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
        }
        F sv = load_h(sc);
        _mm256_store_ps(s, sv.lo);
        _mm256_store_ps(s + 8, sv.hi);
        const __m256i magic = _mm256_set1_epi32(0x4B000000);
        _mm256_store_si256(reinterpret_cast<__m256i*>(mz), _mm256_or_si256(z0, magic));
        _mm256_store_si256(reinterpret_cast<__m256i*>(mz + 8), _mm256_or_si256(z1, magic));
    }
    static inline __attribute__((always_inline)) void copy16(const float* from, float* to) {
        _mm256_store_ps(to, _mm256_load_ps(from));
        _mm256_store_ps(to + 8, _mm256_load_ps(from + 8));
    }
    static inline __attribute__((always_inline)) A zero_acc() { return _mm256_setzero_ps(); }
    static inline __attribute__((always_inline)) A fma_row(F w, const float* x, A acc) {
        return _mm256_fmadd_ps(w.hi, _mm256_loadu_ps(x + 8), _mm256_fmadd_ps(w.lo, _mm256_loadu_ps(x), acc));
    }
    static inline __attribute__((always_inline)) __m256 fold8(A v) { return v; }
    // out[j] = the sum of f[j]'s lanes: pairwise adds interleave the vectors, no per-vector reduction
    static inline __attribute__((always_inline)) void reduce8(const __m256* f, float* out) {
        __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(f[0], f[1]), _mm256_hadd_ps(f[2], f[3]));
        __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(f[4], f[5]), _mm256_hadd_ps(f[6], f[7]));
        _mm256_store_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31)));
    }
    static inline __attribute__((always_inline)) F load_h(const uint16_t* p) {
        return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
    }
    static inline __attribute__((always_inline)) F load_bf(const uint16_t* p) {
        __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
        return {_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16))};
    }
    static inline __attribute__((always_inline)) F load_f(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
    // attention's softmax and sums
    static inline __attribute__((always_inline)) F set1(float v) { __m256 s = _mm256_set1_ps(v); return {s, s}; }
    static inline __attribute__((always_inline)) F mul(F a, F b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
    static inline __attribute__((always_inline)) F max(F a, F b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
    static inline __attribute__((always_inline)) F min(F a, F b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
    static inline __attribute__((always_inline)) F div(F a, F b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
    static inline __attribute__((always_inline)) float hsum8(__m256 v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
    static inline __attribute__((always_inline)) float reduce_add(F v) { return hsum8(_mm256_add_ps(v.lo, v.hi)); }
    static inline __attribute__((always_inline)) float reduce_max(F v) {
        __m256 m = _mm256_max_ps(v.lo, v.hi);
        __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
    }
    // e^x for x <= 0 (softmax after subtracting the maximum), within 2 ulp: 2^n * p(r), x = n ln2 + r
    static inline __attribute__((always_inline)) __m256 exp_neg8(__m256 x) {
        x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
        __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
        r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
        __m256 p = _mm256_set1_ps(1.9875691500e-4f);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
        p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
        // 2^n as a float (n >= -126 after the clamp): the exponent field
        __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
        return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    }
    static inline __attribute__((always_inline)) F exp_neg(F x) { return {exp_neg8(x.lo), exp_neg8(x.hi)}; }
    static inline __attribute__((always_inline)) __m128i to_bf8(__m256 v) {
        __m256i b = _mm256_castps_si256(v);
        __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                                         _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1))));
        __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
        r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r),
                                                 _mm256_castsi256_ps(_mm256_or_si256(b, _mm256_set1_epi32(0x400000))), nan));
        r = _mm256_srli_epi32(r, 16);
        return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    }
    // float32 -> bf16, rounded to nearest even as torch does (NaN kept quiet)
    static inline __attribute__((always_inline)) void store_bf(uint16_t* p, F v) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf8(v.lo));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), to_bf8(v.hi));
    }
    static inline __attribute__((always_inline)) F add(F a, F b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
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
    static const Kernels k{"avx2", &avx2::q_gemv<avx2::S>, &avx2::q_dequant<avx2::S>, &avx2::f16_gemv<avx2::S>,
                           &avx2::q_tables<avx2::S>, &avx2::f16_gemv<avx2::S, true>,
                           &avx2::attn_decode<avx2::S>,
                           &avx2::rms_norm<avx2::S>, &avx2::rope_neox<avx2::S>,
                           &avx2::silu_mul<avx2::S>};
    return k;
}

}  // namespace exlcpu
