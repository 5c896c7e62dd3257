// Interfaces shared by the CPU kernel files. Plain C++ (no torch headers): the ISA-specific files
// (kernels_avx2.cpp, kernels_avx512.cpp) are compiled for their instruction sets and must not emit
// code for inline functions that other files also emit (the linker would keep one copy of each).
#pragma once

#include <cstdint>

namespace exlcpu {

constexpr int kBlock = 16;      // output columns per block: one AVX-512 vector, two AVX2 vectors
constexpr int kChunkRows = 32;  // rows per chunk: a b-bit chunk is exactly b words per column
constexpr int64_t kKeyBlock = 32;  // cached positions per block of the decode attention (a page holds whole blocks)

// A quantized matrix in the CPU layout (built at load by exllamav2/quant/cpu_layout.py):
// the rows are cut into chunks of 32 (padded) rows inside one group; chunk c of column block cb holds
// bits[c] words of 16 int32 at qw[cb][first_word[c]][0..15], lane i an LSB-first bitstream of 32 codes:
// code h * 16 + j is row h * 16 + i of column j. w = fp16(fp16(code - zero) * scale) with the fp16 scale of
// (block, group, column) and zero = 2^(bits-1) (EXL2) or the stored uint8 zero point (GPTQ).
struct QArgs {
    const int32_t* qw;        // [blocks][wtot][16]
    int64_t wtot;             // words per column block
    const int32_t* chunks;    // [nchunks][3]: bits, first word, group
    int64_t nchunks;
    const uint16_t* scales;   // [blocks][groups][16] fp16 bit patterns, or null with sidx
    const uint8_t* zeros;     // [blocks][groups][16], or null for EXL2's 2^(bits-1)
    int64_t ngroups;
    // EXL2: each column's scale is one of its group's 16 values, sidx[blocks][groups][16] its index; gscales
    // [groups][16] those values and gluts [groups][16][kLutStride] their weight tables (built per call by
    // q_tables for groups of at most kLutBits bits)
    const uint8_t* sidx;
    const float* gscales;
    const float* gluts;
    const uint16_t* svalues;  // EXL2 on the pair layout: the fp16 values [groups][16] that sidx indexes
};

constexpr int kLutStride = 32;   // floats per table: up to 5-bit codes

// y[m, n] = sum_p x[m, p] * w[p, n] (+ bias[n]) for the column blocks cb0..cb1; x in padded-row order
// (x[m * kpad + p], zero on padding rows), y[m * ldy + n] for n < N, float32 or (ybf) rounded to bf16.
using QGemvFn = void (*)(const QArgs&, const float* x, int64_t M, int64_t kpad, const float* bias, void* y,
                         bool ybf, int64_t ldy, int64_t N, int64_t cb0, int64_t cb1);
// out[src[p] * ldo + (cb - cb0) * 16 + j] = w[p, cb * 16 + j] for every padded row p with src[p] >= 0
using QDequantFn = void (*)(const QArgs&, const int32_t* src, float* out, int64_t ldo, int64_t cb0, int64_t cb1);
// y[m * N + n] = sum_k x[m * K + k] * w[n * K + k] (w fp16) for output rows n0..n1; x and y float32, or bf16
// with xbf (summed in float32 either way)
using F16GemvFn = void (*)(const void* x, bool xbf, const uint16_t* w, void* y, int64_t M, int64_t K, int64_t N,
                           int64_t n0, int64_t n1);

// gscales[g][k] = values[g][k] as float; gluts[g][k][c] = fp16((c mod 2^b - 2^(b-1)) * gscales[g][k]) for the
// groups whose width b = bits[g] the kernels decode by table (returned by lut_bits)
using QTablesFn = void (*)(const uint16_t* values, const int8_t* bits, int64_t ngroups, float* gscales, float* gluts);

// Causal attention of the last L query positions of each batch b over its first lens[b] (lens null: all S) cached
// keys: query i < L sees the first lens[b] - (L - 1 - i) keys (L = 1: a decode step, seeing them all), every query
// head the same: for query head h (kv head h / G, G = Hq / Hkv), out = softmax(scale * q . k) @ v, in fp32, zeros
// where no key is seen. q and out are [B * L][Hq][D] (row stride qb per query), key s of kv head j at k + b * kb +
// s * ks + j * D (v likewise); elements bf16 (bf16 true) or fp32. Paged (pages non-null, L = 1): k and v are pools
// of pages of page_size positions (a multiple of 32), key s of batch b at row pages[b * pages_stride + s /
// page_size] * page_size + s % page_size of the pool (kb, vb unused). A task is one (query, kv head): tasks t0 ..
// t1 - 1 of B * L * Hkv.
struct AttnArgs {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    const int64_t* lens;
    int64_t B, Hq, Hkv, D, S, qb, kb, ks, vb, vs;
    float scale;
    bool bf16;
    const int32_t* pages = nullptr;
    int64_t page_size = 0, pages_stride = 0;
    int64_t L = 1;
};
using AttnFn = void (*)(const AttnArgs&, int64_t t0, int64_t t1);

// RMS norm of rows r0 .. r1 - 1 of x [rows][D] with float32 weight w into y; x and y float32, or bf16 with bf
using RmsNormFn = void (*)(const void* x, bool bf, const float* w, void* y, int64_t D, float eps, int64_t r0,
                           int64_t r1);
// NeoX RoPE of rows r0 .. r1 - 1 of x [rows][H][D] (first R dims) by cos, sin [rows][R] into y; x, y as above
using RopeFn = void (*)(const void* x, bool bf, const float* cos, const float* sin, void* y, int64_t H, int64_t D,
                        int64_t R, int64_t r0, int64_t r1);
// y = silu(g) * u over n elements (g, u, y float32, or bf16 with bf): silu(g) rounded to the element type, then
// the product, as the twin's two ops round them (silu within a few float32 ulp of torch's)
using ActMulFn = void (*)(const void* g, const void* u, bool bf, void* y, int64_t n);

// The pair layout (kernels_avx512bf16.cpp), bf16 activations: x [M][npairs] the activations in padded-row order
// as bf16 pairs (rows 2p, 2p + 1 of a chunk in one uint32), xs [M][nchunks] each chunk's sum of them; y bf16.
using QPairGemvFn = void (*)(const QArgs&, const uint32_t* x, const float* xs, int64_t M, int64_t npairs,
                             const float* bias, uint16_t* y, int64_t ldy, int64_t N, int64_t cb0, int64_t cb1);

struct Kernels {
    const char* name;
    QGemvFn q_gemv;
    QDequantFn q_dequant;
    F16GemvFn f16_gemv;
    QTablesFn q_tables;
    F16GemvFn bf16_gemv;    // f16_gemv with bf16 weights
    AttnFn attn_decode;
    RmsNormFn rms_norm;
    RopeFn rope_neox;
    ActMulFn silu_mul;
    QPairGemvFn q_gemv_pairs = nullptr;       // the pair layout's kernels: only where the CPU has AVX512-BF16
    QDequantFn q_dequant_pairs = nullptr;
};

// The avx512bf16 set's AttnFn and bf16 F16GemvFn: bf16 operands by bf16 dot products (dots_avx512bf16.cpp), float32
// as kernels_avx512
namespace avx512bf16 {
void attn_decode_dots(const AttnArgs& a, int64_t t0, int64_t t1);
void bf16_gemv_dots(const void* x, bool xbf, const uint16_t* w, void* y, int64_t M, int64_t K, int64_t N, int64_t n0,
                    int64_t n1);
}

const Kernels& kernels_avx2();
const Kernels& kernels_avx512();
const Kernels& kernels_avx512bf16();

}  // namespace exlcpu
