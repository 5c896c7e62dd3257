// The quantized decode kernel for CPUs with AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids and later), on the
// pair layout (quant/cpu_layout.py, pairs=True) and bf16 activations: one vdpbf16ps multiplies 16 columns x 2
// rows, so a step is a shift, a ternary-logic op and the dot product for 32 weights (the float32 kernel needs a
// shift, a table permute and an FMA for 16). The columns sit in the lanes, so no horizontal sums either.
//
// Layout of a chunk (32 rows of one group x 16 columns, B words per lane): lane j is column j; the low halves of
// its B words are an LSB-first stream of the 16 codes of the even rows (row 2p at bit p * B), the high halves the
// odd rows'. 8-bit codes are two 4-bit streams, low nibbles then high. 16-bit shifts bring code p of both rows
// to the bottom of their halves; 0x4300 | code is bf16(128 + code), exact for codes below 128; and
// sum (code - zero) x = sum (128 + code) x - (128 + zero) sum x, sum x over the chunk's rows given per call.
// The weight is (code - zero) * scale without the twin's fp16 rounding of each weight: an exact product, against
// activations already rounded to bf16 (tests/test_cpu_exl2.py bounds the difference).

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

#include "qkernel_impl.h"     // the shared scalar helpers (bf16 rounding, row groups), here in this ISA's namespace

#define PAIR_INLINE inline __attribute__((always_inline))

// code p of every half at the bottom of its half (bits above it left for the mask)
template <int B, int P>
PAIR_INLINE __m512i digits(const int32_t* w) {
    constexpr int pos = P * B, wi = pos / 16, sh = pos % 16;
    __m512i c = _mm512_loadu_si512(w + wi * kBlock);
    if constexpr (sh != 0) c = _mm512_srli_epi16(c, sh);
    if constexpr (sh + B > 16)
        c = _mm512_or_si512(c, _mm512_slli_epi16(_mm512_loadu_si512(w + (wi + 1) * kBlock), 16 - sh));
    return c;
}

// bf16(128 + code) in every half: (c & mask) | 0x4300 in one ternary-logic op
template <int B>
PAIR_INLINE __m512bh offset_bf16(__m512i c) {
    return (__m512bh)_mm512_ternarylogic_epi32(c, _mm512_set1_epi16((1 << B) - 1), _mm512_set1_epi16(0x4300), 0xEA);
}

// acc[m][p % NA] += sum over pair p of bf16(128 + code) * x[m] for the chunk's 16 row pairs; x holds the pairs of
// activation row m at x[m * ld + p]. NA chains per row keep the dot products' latency hidden; their number and
// order do not depend on MR, so a row's result does not depend on the rows beside it.
template <int B, int MR, int NA>
struct Dots {
    template <int P>
    static PAIR_INLINE void step(const int32_t* w, const uint32_t* x, int64_t ld, __m512 (&acc)[MR][NA]) {
        const __m512bh wv = offset_bf16<B>(digits<B, P>(w));
        for (int m = 0; m < MR; ++m)
            acc[m][P % NA] = _mm512_dpbf16_ps(acc[m][P % NA], wv, (__m512bh)_mm512_set1_epi32(int(x[m * ld + P])));
    }
    template <int... P>
    static PAIR_INLINE void run(const int32_t* w, const uint32_t* x, int64_t ld, __m512 (&acc)[MR][NA],
                                std::integer_sequence<int, P...>) {
        (step<P>(w, x, ld, acc), ...);
    }
};

// sum over the chunk's rows of (128 + code) x for MR activation rows (for 8 bits: 16 x high nibble + low nibble,
// each with its 128, so 2176 + code) into s[m]; returns the offset 128 or 2176 that goes with it
template <int B, int MR>
PAIR_INLINE float chunk_dots(const int32_t* w, const uint32_t* x, int64_t ld, __m512 (&s)[MR]) {
    constexpr int NA = 4;       // for every MR: a row's sum is then the same bits at any batch size
    constexpr auto seq = std::make_integer_sequence<int, 16>{};
    __m512 acc[MR][NA];
    for (int m = 0; m < MR; ++m)
        for (int i = 0; i < NA; ++i) acc[m][i] = _mm512_setzero_ps();
    if constexpr (B == 8) {
        __m512 hi[MR][NA];
        for (int m = 0; m < MR; ++m)
            for (int i = 0; i < NA; ++i) hi[m][i] = _mm512_setzero_ps();
        Dots<4, MR, NA>::run(w, x, ld, acc, seq);
        Dots<4, MR, NA>::run(w + 4 * kBlock, x, ld, hi, seq);
        for (int m = 0; m < MR; ++m)
            for (int i = 0; i < NA; ++i) acc[m][i] = _mm512_fmadd_ps(hi[m][i], _mm512_set1_ps(16.f), acc[m][i]);
    } else {
        Dots<B, MR, NA>::run(w, x, ld, acc, seq);
    }
    for (int m = 0; m < MR; ++m) {
        s[m] = acc[m][0];
        for (int i = 1; i < NA; ++i) s[m] = _mm512_add_ps(s[m], acc[m][i]);
    }
    return B == 8 ? 2176.f : 128.f;
}

// the 16 columns' scales of (block cb, group g): EXL2's indexed values or the stored fp16 scales
PAIR_INLINE __m512 block_scales(const QArgs& a, int64_t cb, int g) {
    const int64_t at = (cb * a.ngroups + g) * kBlock;
    if (a.sidx) {
        const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.sidx + at)));
        const __m512 values = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.svalues + g * 16)));
        return _mm512_permutexvar_ps(idx, values);
    }
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.scales + at)));
}

// each column's zero: the stored GPTQ zero point or EXL2's 2^(bits-1)
PAIR_INLINE __m512 block_zeros(const QArgs& a, int64_t cb, int g, int bits) {
    if (!a.zeros) return _mm512_set1_ps(float(1 << (bits - 1)));
    const uint8_t* z = a.zeros + (cb * a.ngroups + g) * kBlock;
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z))));
}

template <int MR>
PAIR_INLINE float chunk_sums(int bits, const int32_t* w, const uint32_t* x, int64_t ld, __m512 (&s)[MR]) {
    switch (bits) {
        case 2: return chunk_dots<2, MR>(w, x, ld, s);
        case 3: return chunk_dots<3, MR>(w, x, ld, s);
        case 4: return chunk_dots<4, MR>(w, x, ld, s);
        case 5: return chunk_dots<5, MR>(w, x, ld, s);
        case 6: return chunk_dots<6, MR>(w, x, ld, s);
        default: return chunk_dots<8, MR>(w, x, ld, s);    // checked: 2..6, 8
    }
}

// y[m][cb's columns] for MR activation rows: x the bf16 pairs (x[m * npairs + c * 16 + p]: chunk c, pair p),
// xs[m * nchunks + c] the sum of chunk c's activations
template <int MR>
void pair_block(const QArgs& a, int64_t cb, const uint32_t* x, const float* xs, int64_t npairs, const float* bias,
                uint16_t* y, int64_t ldy, int ncol) {
    __m512 total[MR];
    for (int m = 0; m < MR; ++m) total[m] = _mm512_setzero_ps();
    const int32_t* blk = a.qw + cb * a.wtot * kBlock;
    for (int64_t c = 0; c < a.nchunks; ++c) {
        const int32_t* ch = a.chunks + c * 3;
        __m512 s[MR];
        const float off = chunk_sums<MR>(ch[0], blk + int64_t(ch[1]) * kBlock, x + c * 16, npairs, s);
        const __m512 scale = block_scales(a, cb, ch[2]);
        const __m512 shift = _mm512_add_ps(block_zeros(a, cb, ch[2], ch[0]), _mm512_set1_ps(off));
        for (int m = 0; m < MR; ++m) {
            const __m512 dot = _mm512_fnmadd_ps(shift, _mm512_set1_ps(xs[m * a.nchunks + c]), s[m]);
            total[m] = _mm512_fmadd_ps(dot, scale, total[m]);
        }
    }
    for (int m = 0; m < MR; ++m) {
        alignas(64) float out[kBlock];
        _mm512_store_ps(out, total[m]);
        for (int j = 0; j < ncol; ++j) y[m * ldy + j] = float_to_elem<true>(bias ? out[j] + bias[j] : out[j]);
    }
}

void q_gemv_pairs(const QArgs& a, const uint32_t* x, const float* xs, int64_t M, int64_t npairs, const float* bias,
                  uint16_t* y, int64_t ldy, int64_t N, int64_t cb0, int64_t cb1) {
    column_blocks(cb0, cb1, N, bias, [&](int64_t cb, int64_t n0, int ncol, const float* b) {
        row_groups(M, [&](auto mr, int64_t m) {
            pair_block<decltype(mr)::value>(a, cb, x + m * npairs, xs + m * a.nchunks, npairs, b, y + m * ldy + n0, ldy,
                                            ncol);
        });
    });
}

// the codes of pair p of a chunk as int32 halves: even rows' (low halves) and odd rows' (high halves)
template <int B, int P>
PAIR_INLINE void codes_at(const int32_t* w, __m512i& even, __m512i& odd) {
    if constexpr (B == 8) {
        const __m512i lo = digits<4, P>(w), hi = digits<4, P>(w + 4 * kBlock);
        const __m512i c = _mm512_or_si512(_mm512_and_si512(lo, _mm512_set1_epi16(15)),
                                          _mm512_slli_epi16(_mm512_and_si512(hi, _mm512_set1_epi16(15)), 4));
        even = _mm512_and_si512(c, _mm512_set1_epi32(0xFF));
        odd = _mm512_srli_epi32(c, 16);
    } else {
        const __m512i c = _mm512_and_si512(digits<B, P>(w), _mm512_set1_epi16((1 << B) - 1));
        even = _mm512_and_si512(c, _mm512_set1_epi32(0xFFFF));
        odd = _mm512_srli_epi32(c, 16);
    }
}

// the twin's weight fp16(fp16(code - zero) * scale) as float (code - zero and the product are exact in float)
PAIR_INLINE __m512 weight(__m512i code, __m512 zero, __m512 scale) {
    const __m512 w = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(code), zero), scale);
    return _mm512_cvtph_ps(_mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

template <int B>
struct ChunkRows {
    template <int P>
    static PAIR_INLINE void step(const int32_t* w, __m512 zero, __m512 scale, const int32_t* src, float* o,
                                 int64_t ldo) {
        __m512i even, odd;
        codes_at<B, P>(w, even, odd);
        if (src[2 * P] >= 0) _mm512_storeu_ps(o + src[2 * P] * ldo, weight(even, zero, scale));
        if (src[2 * P + 1] >= 0) _mm512_storeu_ps(o + src[2 * P + 1] * ldo, weight(odd, zero, scale));
    }
    template <int... P>
    static PAIR_INLINE void run(const int32_t* w, __m512 zero, __m512 scale, const int32_t* src, float* o,
                                int64_t ldo, std::integer_sequence<int, P...>) {
        (step<P>(w, zero, scale, src, o, ldo), ...);
    }
};

// out[src[p] * ldo + (cb - cb0) * 16 + j] = w[p, cb * 16 + j] (QDequantFn on the pair layout)
void q_dequant_pairs(const QArgs& a, const int32_t* src, float* out, int64_t ldo, int64_t cb0, int64_t cb1) {
    constexpr auto seq = std::make_integer_sequence<int, 16>{};
    for (int64_t cb = cb0; cb < cb1; ++cb) {
        const int32_t* blk = a.qw + cb * a.wtot * kBlock;
        float* o = out + (cb - cb0) * kBlock;
        for (int64_t c = 0; c < a.nchunks; ++c) {
            const int32_t* ch = a.chunks + c * 3;
            const int32_t* w = blk + int64_t(ch[1]) * kBlock;
            const __m512 scale = block_scales(a, cb, ch[2]), zero = block_zeros(a, cb, ch[2], ch[0]);
            const int32_t* sr = src + c * kChunkRows;
            switch (ch[0]) {
                case 2: ChunkRows<2>::run(w, zero, scale, sr, o, ldo, seq); break;
                case 3: ChunkRows<3>::run(w, zero, scale, sr, o, ldo, seq); break;
                case 4: ChunkRows<4>::run(w, zero, scale, sr, o, ldo, seq); break;
                case 5: ChunkRows<5>::run(w, zero, scale, sr, o, ldo, seq); break;
                case 6: ChunkRows<6>::run(w, zero, scale, sr, o, ldo, seq); break;
                default: ChunkRows<8>::run(w, zero, scale, sr, o, ldo, seq); break;
            }
        }
    }
}

}  // namespace avx512bf16

#pragma GCC pop_options

const Kernels& kernels_avx512bf16() {
    static const Kernels k = [] {
        Kernels t = kernels_avx512();
        t.name = "avx512bf16";
        t.q_gemv_pairs = &avx512bf16::q_gemv_pairs;
        t.q_dequant_pairs = &avx512bf16::q_dequant_pairs;
        t.attn_decode = &avx512bf16::attn_decode_dots;
        t.bf16_gemv = &avx512bf16::bf16_gemv_dots;
        return t;
    }();
    return k;
}

}  // namespace exlcpu
