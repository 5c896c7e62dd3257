// The AVX-512F traits type S of qkernel_impl.h, included inside the namespace and target region of each file
// built on it (kernels_avx512.cpp; kernels_avx512bf16.cpp, whose attention builds on it), so every file's
// instantiations are compiled for its own ISA under its own names.

struct S {
    using I = __m512i;
    using F = __m512;
    using A = __m512;                 // a column's 16 partial sums (one per row lane)
    static constexpr int kAccRegs = 16;   // of 32 registers: the rest hold x, codes and temporaries
    static constexpr int kLutBits = 5;    // vpermps reaches 16 entries, vpermt2ps 32
    static constexpr bool kHalvesTogether = true;   // the order of a chunk's steps (ChunkFma)
    static constexpr bool kDotBf16 = false;         // bf16 attention by vdpbf16ps (attn_span_dots)

    static inline __attribute__((always_inline)) I load_i(const int32_t* p) { return _mm512_loadu_si512(p); }
    template <int n> static inline __attribute__((always_inline)) I srl(I v) {
        if constexpr (n == 0) return v; else return _mm512_srli_epi32(v, n);
    }
    template <int n> static inline __attribute__((always_inline)) I sll(I v) { return _mm512_slli_epi32(v, n); }
    static inline __attribute__((always_inline)) I or_i(I a, I b) { return _mm512_or_si512(a, b); }
    static inline __attribute__((always_inline)) F round_h(F v) {
        return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    // (2^23 + zero) .. (2^23 + 2^bits - 1 - zero): 2^23 + code as a float, minus 2^23 + zero, is code - zero
    static inline __attribute__((always_inline)) F code_minus_zero(I c, const float* mz) {
        return _mm512_sub_ps(_mm512_castsi512_ps(_mm512_or_si512(c, _mm512_set1_epi32(0x4B000000))),
                             _mm512_set1_ps(*mz));
    }
    // codes -> weights: a table lookup (the permutes read only the low 4 or 5 bits, so bits above the code
    // need no mask: tables of narrower codes repeat), else fp16((code - zero) * s). Exact: no bits above;
    // Z: zero points in mz, else 2^(B-1).
    template <int B, bool Exact, bool Z>
    static inline __attribute__((always_inline)) F decode(I c, const float* lut, const float* s, const float* mz) {
        if constexpr (B <= 4) {
            return _mm512_permutexvar_ps(c, _mm512_load_ps(lut));
        } else if constexpr (B == 5) {
            return _mm512_permutex2var_ps(_mm512_load_ps(lut), c, _mm512_load_ps(lut + 16));
        } else {
            if constexpr (!Exact) c = _mm512_and_si512(c, _mm512_set1_epi32((1 << B) - 1));
            const float z = Z ? *mz : 8388608.f + (1 << (B - 1));   // a register constant without zero points
            return round_h(_mm512_mul_ps(code_minus_zero(c, &z), _mm512_set1_ps(*s)));
        }
    }
    static inline __attribute__((always_inline)) void build_lut(int bits, const float* s, const float* mz, float* lut) {
        const __m512i mask = _mm512_set1_epi32((1 << bits) - 1);
        const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int h = 0; h < (bits > 4 ? 2 : 1); ++h) {
            __m512i c = _mm512_and_si512(_mm512_add_epi32(iota, _mm512_set1_epi32(16 * h)), mask);
            _mm512_store_ps(lut + 16 * h, round_h(_mm512_mul_ps(code_minus_zero(c, mz), _mm512_set1_ps(*s))));
        }
    }
    // s[j] = scale, mz[j] = 2^23 + zero of the block's 16 columns (zero 2^(bits-1) without zero points)
    static inline __attribute__((always_inline)) void scales(const uint16_t* sc, const uint8_t* zr, int bits,
                                                             float* s, float* mz) {
        __m512i z = zr ? _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(zr)))
                       : _mm512_set1_epi32(1 << (bits - 1));
        _mm512_store_ps(s, load_h(sc));
        _mm512_store_si512(mz, _mm512_or_si512(z, _mm512_set1_epi32(0x4B000000)));
    }
    static inline __attribute__((always_inline)) void copy16(const float* from, float* to) {
        _mm512_store_ps(to, _mm512_load_ps(from));
    }
    static inline __attribute__((always_inline)) A zero_acc() { return _mm512_setzero_ps(); }
    static inline __attribute__((always_inline)) A fma_row(F w, const float* x, A acc) {
        return _mm512_fmadd_ps(w, _mm512_loadu_ps(x), acc);
    }
    static inline __attribute__((always_inline)) __m256 hi8(F v) {
        return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    }
    static inline __attribute__((always_inline)) __m256 fold8(A v) { return _mm256_add_ps(_mm512_castps512_ps256(v), hi8(v)); }
    // out[j] = the sum of f[j]'s lanes: pairwise adds interleave the vectors, no per-vector reduction
    static inline __attribute__((always_inline)) void reduce8(const __m256* f, float* out) {
        __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(f[0], f[1]), _mm256_hadd_ps(f[2], f[3]));
        __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(f[4], f[5]), _mm256_hadd_ps(f[6], f[7]));
        _mm256_store_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31)));
    }
    static inline __attribute__((always_inline)) F load_h(const uint16_t* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static inline __attribute__((always_inline)) F load_bf(const uint16_t* p) {
        __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    static inline __attribute__((always_inline)) F load_f(const float* p) { return _mm512_loadu_ps(p); }
    // attention's softmax and sums
    static inline __attribute__((always_inline)) F set1(float v) { return _mm512_set1_ps(v); }
    static inline __attribute__((always_inline)) F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static inline __attribute__((always_inline)) F max(F a, F b) { return _mm512_max_ps(a, b); }
    static inline __attribute__((always_inline)) F min(F a, F b) { return _mm512_min_ps(a, b); }
    static inline __attribute__((always_inline)) F div(F a, F b) { return _mm512_div_ps(a, b); }
    static inline __attribute__((always_inline)) float reduce_add(F v) { return _mm512_reduce_add_ps(v); }
    static inline __attribute__((always_inline)) float reduce_max(F v) { return _mm512_reduce_max_ps(v); }
    // e^x for x <= 0 (softmax after subtracting the maximum), within 2 ulp: 2^n * p(r), x = n ln2 + r
    static inline __attribute__((always_inline)) F exp_neg(F x) {
        x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
        F n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        F r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x);
        r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
        F p = _mm512_set1_ps(1.9875691500e-4f);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
        p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
        return _mm512_scalef_ps(p, n);
    }
    // float32 -> bf16, rounded to nearest even as torch does (NaN kept quiet)
    static inline __attribute__((always_inline)) void store_bf(uint16_t* p, F v) {
        __m512i b = _mm512_castps_si512(v);
        __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                         _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(b, _mm512_set1_epi32(0x400000)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    }
    static inline __attribute__((always_inline)) F add(F a, F b) { return _mm512_add_ps(a, b); }
    static inline __attribute__((always_inline)) F fmav(F a, F b, F acc) { return _mm512_fmadd_ps(a, b, acc); }
    static inline __attribute__((always_inline)) F zero() { return _mm512_setzero_ps(); }
    static inline __attribute__((always_inline)) void store(float* p, F v) { _mm512_storeu_ps(p, v); }
    static inline __attribute__((always_inline)) float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
    static inline __attribute__((always_inline)) void hsum4(F a, F b, F c, F d, float* out) {
        // fold 512 -> 256 bits, then the AVX2 transposed sum
        __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(fold8(a), fold8(b)), _mm256_hadd_ps(fold8(c), fold8(d)));
        _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
    }
};
