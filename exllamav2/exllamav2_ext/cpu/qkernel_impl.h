// The kernels, written once over a SIMD traits type S. Included by kernels_avx2.cpp, kernels_avx512.cpp (S from
// simd_avx512.h), kernels_avx512bf16.cpp (its scalar helpers) and dots_avx512bf16.cpp inside their own namespace
// and target region, so each instantiation is compiled for its ISA and has its own symbol names.
//
// Quantized layout (cpu_layout.py): a chunk is 32 rows of one group x 16 columns, B words per lane; lane i
// holds rows i and 16 + i, its B words an LSB-first bitstream of 32 codes, code p = h * 16 + j being row
// h * 16 + i of column j. One shift (plus a mask or a table lookup) gives the codes of 16 consecutive rows of
// one column: the vector that multiplies 16 consecutive activations, so a column's partial sums stay in one
// accumulator (lanes = rows) and nothing is broadcast per weight.
//
// S provides: I (16 x int32), F (16 x float), A (a column's accumulator), kAccRegs (accumulators that fit in
// registers beside the rest), load_i, srl<n>, sll<n>, or_i, decode<B> (codes -> exact fp16 weights, by table
// lookup where the ISA's permutes reach 2^B entries, else by arithmetic), build_lut, fma_row (acc += w * x[16]),
// fold8 (A -> 8 partial sums), reduce8, load_h, load_f, fmav, zero, add, hsum4, half_to_float, kDotBf16 (whether
// a bf16 cache's attention and bf16 weights times bf16 activations go to the dot-product kernels).

// (includes <utility> for std::integer_sequence must come before, outside the namespace)

#define EXL_INLINE inline __attribute__((always_inline))

// Activations, keys and values: float32, or bf16 (the upper half of a float32: a shift) widened on load and
// rounded to nearest even on store (as torch rounds), all arithmetic in float32.
template <bool BF>
using Elem = std::conditional_t<BF, uint16_t, float>;

EXL_INLINE float bf16_to_float(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

template <bool BF>
EXL_INLINE float elem_to_float(Elem<BF> e) {
    if constexpr (BF) return bf16_to_float(e); else return e;
}

template <bool BF>
EXL_INLINE Elem<BF> float_to_elem(float f) {
    if constexpr (BF) {
        uint32_t u;
        std::memcpy(&u, &f, sizeof u);
        if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);    // NaN stays a quiet NaN
        return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    } else {
        return f;
    }
}

// f(std::integral_constant<int, MR>{}, m) for the activation rows m .. m + MR - 1 of M, in groups of 4, then 2,
// then 1 (the kernels' row counts per pass)
template <class F>
EXL_INLINE void row_groups(int64_t M, F&& f) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) f(std::integral_constant<int, 4>{}, m);
    if (m + 2 <= M) {
        f(std::integral_constant<int, 2>{}, m);
        m += 2;
    }
    if (m < M) f(std::integral_constant<int, 1>{}, m);
}

// f(cb, n0, ncol, the block's bias or null) for the column blocks cb0 .. cb1 - 1 that hold some of the N columns
template <class F>
EXL_INLINE void column_blocks(int64_t cb0, int64_t cb1, int64_t N, const float* bias, F&& f) {
    for (int64_t cb = cb0; cb < cb1 && cb * kBlock < N; ++cb) {
        const int64_t n0 = cb * kBlock;
        f(cb, n0, int(N - n0 < kBlock ? N - n0 : kBlock), bias ? bias + n0 : nullptr);
    }
}

template <class S, bool BF>
EXL_INLINE typename S::F load_elems(const Elem<BF>* p) {
    if constexpr (BF) return S::load_bf(p); else return S::load_f(p);
}

// A group's decoding constants for NC columns of a block: w = fp16((code - zero) * scale). code - zero is
// exact in fp32 as (2^23 + code) - (2^23 + zero), 2^23 + code being the float with code in its low mantissa
// bits (no int -> float conversion), and the product with the fp16 scale is exact (8-bit integer x 11-bit
// mantissa), so the one rounding to fp16 is the twin's.
template <int NC>
struct GroupConsts {
    alignas(64) float lut[NC][kLutStride];   // the weight of every code (codes of <= 4 bits repeated)
    alignas(64) float s[kBlock], mz[kBlock];  // scale and 2^23 + zero of each column of the block
    int group = -1, bits = -1;
};

// Rebuilt once per group: the tables are the one place the fp16 rounding is paid per value, all columns
// at once so the conversions overlap. Not inlined: the decode loop then reads the tables from memory
// (a free operand of the permute) and keeps its accumulators in registers.
template <class S, int NC, int J0>
__attribute__((noinline)) void build_group(GroupConsts<NC>& g, const QArgs& a, int64_t cb, int group, int bits) {
    g.group = group;
    g.bits = bits;
    const int64_t at = (cb * a.ngroups + group) * kBlock;
    S::scales(a.scales + at, a.zeros ? a.zeros + at : nullptr, bits, g.s, g.mz);
    // broadcast each column's constants from memory (a load) rather than permute them out of a register
    // (the permutes compete with the conversions)
    __asm__ volatile("" ::: "memory");
    if (bits <= S::kLutBits)
        for (int j = 0; j < NC; ++j) S::build_lut(bits, g.s + J0 + j, g.mz + J0 + j, g.lut[j]);
}

// With EXL2's indexed scales the tables were built once per call (q_tables): a column's is copied
// (inlined: a few loads and stores, no call that would spill the accumulators).
template <class S, int NC, int J0>
EXL_INLINE void copy_group(GroupConsts<NC>& g, const QArgs& a, int64_t cb, int group, int bits) {
    g.group = group;
    g.bits = bits;
    const uint8_t* idx = a.sidx + (cb * a.ngroups + group) * kBlock + J0;
    const float mz = 8388608.f + float(1 << (bits - 1));
    for (int j = 0; j < NC; ++j) {
        const int64_t k = group * 16 + (idx[j] & 15);      // masked: the indices are not checked per call
        g.s[J0 + j] = a.gscales[k];
        g.mz[J0 + j] = mz;
        if (bits <= S::kLutBits)
            for (int c = 0; c < (bits > 4 ? 2 : 1); ++c)
                S::copy16(a.gluts + k * kLutStride + 16 * c, g.lut[j] + 16 * c);
    }
}

template <class S, int NC, int J0>
EXL_INLINE void set_group(GroupConsts<NC>& g, const QArgs& a, int64_t cb, int group, int bits) {
    if (group == g.group && bits == g.bits) return;
    if (a.sidx)
        copy_group<S, NC, J0>(g, a, cb, group, bits);
    else
        build_group<S, NC, J0>(g, a, cb, group, bits);
}

template <class S>
void q_tables(const uint16_t* values, const int8_t* bits, int64_t ngroups, float* gscales, float* gluts) {
    for (int64_t g = 0; g < ngroups; ++g) {
        S::store(gscales + g * 16, S::load_h(values + g * 16));
        if (bits[g] < 2 || bits[g] > S::kLutBits) continue;
        const float mz = 8388608.f + float(1 << (bits[g] - 1));
        for (int k = 0; k < 16; ++k) S::build_lut(bits[g], gscales + g * 16 + k, &mz, gluts + (g * 16 + k) * kLutStride);
    }
}

// The codes of the 16 rows of code position P (row half P / 16, column P % 16): B bits at stream bit P * B,
// straddling two words for B = 3, 5, 6. Bits above the code are left for decode<B> (masked or ignored).
template <class S, int B, int P>
EXL_INLINE typename S::I codes(const int32_t* w) {
    constexpr int pos = P * B, wi = pos / 32, sh = pos % 32;
    typename S::I c = S::template srl<sh>(S::load_i(w + wi * kBlock));
    if constexpr (sh + B > 32) c = S::or_i(c, S::template sll<32 - sh>(S::load_i(w + (wi + 1) * kBlock)));
    return c;
}

// Z: the layer has zero points (GPTQ); without them the zero is the constant 2^(B-1)
template <class S, int B, bool Z, int P, int J0, int NC>
EXL_INLINE typename S::F weights(const int32_t* w, const GroupConsts<NC>& g, int jj) {
    constexpr int sh = P * B % 32;
    return S::template decode<B, sh + B == 32, Z>(codes<S, B, P>(w), g.lut[jj], g.s + J0 + jj, g.mz + J0 + jj);
}

// acc[m][jj] += w[rows of the chunk, column J0 + jj] . x[m][rows] for the chunk's 32 rows.
template <class S, int B, bool Z, int J0, int NC, int MR>
struct ChunkFma {
    using A = typename S::A;
    template <int Q>
    static EXL_INLINE void step(const int32_t* w, const GroupConsts<NC>& g, const float* x, int64_t kpad,
                                A (&acc)[MR][NC]) {
        // S::kHalvesTogether: both row halves of a column in turn (a column's table and constants live only
        // briefly: fewer spills with AVX-512's 16 accumulators), else every column's first half, then the second
        // (longer distance between an accumulator's FMAs: AVX2 chains two per half into one accumulator)
        constexpr int h = S::kHalvesTogether ? Q % 2 : Q / NC, jj = S::kHalvesTogether ? Q / 2 : Q % NC;
        typename S::F wv = weights<S, B, Z, h * 16 + J0 + jj, J0>(w, g, jj);
        for (int m = 0; m < MR; ++m) acc[m][jj] = S::fma_row(wv, x + m * kpad + h * 16, acc[m][jj]);
    }
    template <int... Q>
    static EXL_INLINE void run(const int32_t* w, const GroupConsts<NC>& g, const float* x, int64_t kpad,
                               A (&acc)[MR][NC], std::integer_sequence<int, Q...>) {
        (step<Q>(w, g, x, kpad, acc), ...);
    }
};

// The chunks from c on while they have B bits (EXL2's bit widths come in bands of rows): the switch on the
// width is taken once per band, not per chunk, and the accumulators stay in registers through the band.
template <class S, int B, bool Z, int J0, int NC, int MR>
EXL_INLINE int64_t chunk_run(const QArgs& a, int64_t cb, int64_t c, GroupConsts<NC>& g, const float* x,
                             int64_t kpad, typename S::A (&acc)[MR][NC]) {
    const int32_t* blk = a.qw + cb * a.wtot * kBlock;
    do {
        const int32_t* ch = a.chunks + c * 3;
        const int32_t* w = blk + int64_t(ch[1]) * kBlock;
        // (no software prefetch: the hardware prefetcher follows the block's stream, and prefetches slowed it)
        set_group<S, NC, J0>(g, a, cb, ch[2], B);
        ChunkFma<S, B, Z, J0, NC, MR>::run(w, g, x + c * kChunkRows, kpad, acc,
                                        std::make_integer_sequence<int, 2 * NC>{});
    } while (++c < a.nchunks && a.chunks[c * 3] == B);
    return c;
}

template <class S, int B, int J0, int NC, int MR>
EXL_INLINE int64_t chunk_run_z(const QArgs& a, int64_t cb, int64_t c, GroupConsts<NC>& g, const float* x,
                               int64_t kpad, typename S::A (&acc)[MR][NC]) {
    if constexpr (B <= S::kLutBits) {    // the tables hold the zero
        return chunk_run<S, B, false, J0, NC, MR>(a, cb, c, g, x, kpad, acc);
    } else {
        return a.zeros ? chunk_run<S, B, true, J0, NC, MR>(a, cb, c, g, x, kpad, acc)
                       : chunk_run<S, B, false, J0, NC, MR>(a, cb, c, g, x, kpad, acc);
    }
}

// One pass over every chunk of column block cb for its columns J0 .. J0 + NC - 1 and MR activation rows:
// the sums of each column go to out[m * kBlock + J0 + jj]. The block's words are one contiguous stream.
template <class S, int J0, int NC, int MR>
void block_pass(const QArgs& a, int64_t cb, const float* x, int64_t kpad, float* out) {
    using A = typename S::A;
    A acc[MR][NC];
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < NC; ++j) acc[m][j] = S::zero_acc();
    GroupConsts<NC> g;
    for (int64_t c = 0; c < a.nchunks;) {
        switch (a.chunks[c * 3]) {
            case 2: c = chunk_run_z<S, 2, J0, NC, MR>(a, cb, c, g, x, kpad, acc); break;
            case 3: c = chunk_run_z<S, 3, J0, NC, MR>(a, cb, c, g, x, kpad, acc); break;
            case 4: c = chunk_run_z<S, 4, J0, NC, MR>(a, cb, c, g, x, kpad, acc); break;
            case 5: c = chunk_run_z<S, 5, J0, NC, MR>(a, cb, c, g, x, kpad, acc); break;
            case 6: c = chunk_run_z<S, 6, J0, NC, MR>(a, cb, c, g, x, kpad, acc); break;
            default: c = chunk_run_z<S, 8, J0, NC, MR>(a, cb, c, g, x, kpad, acc); break;  // checked: 2..6, 8
        }
    }
    for (int m = 0; m < MR; ++m)
        for (int j0 = 0; j0 < NC; j0 += 8) {
            __m256 f[8];
            for (int j = 0; j < 8; ++j) f[j] = j0 + j < NC ? S::fold8(acc[m][j0 + j]) : _mm256_setzero_ps();
            alignas(32) float s[8];
            S::reduce8(f, s);
            for (int j = 0; j < 8 && j0 + j < NC; ++j) out[m * kBlock + J0 + j0 + j] = s[j];
        }
}

template <class S, int MR, int... J>
EXL_INLINE void block_passes(const QArgs& a, int64_t cb, const float* x, int64_t kpad, float* out,
                             std::integer_sequence<int, J...>) {
    constexpr int NC = S::kAccRegs / MR;
    (block_pass<S, J * NC, NC, MR>(a, cb, x, kpad, out), ...);
}

// MR activation rows of column block cb: as many columns per pass as the accumulators allow, later passes
// reading the block's words again from cache.
template <class S, int MR, bool YBF>
void q_block_rows(const QArgs& a, int64_t cb, const float* x, int64_t kpad, const float* bias, Elem<YBF>* y,
                  int64_t ldy, int ncol) {
    alignas(64) float out[MR * kBlock];
    block_passes<S, MR>(a, cb, x, kpad, out, std::make_integer_sequence<int, kBlock / (S::kAccRegs / MR)>{});
    for (int m = 0; m < MR; ++m)
        for (int j = 0; j < ncol; ++j)
            y[m * ldy + j] = float_to_elem<YBF>(bias ? out[m * kBlock + j] + bias[j] : out[m * kBlock + j]);
}

template <class S, bool YBF>
void q_gemv_rows(const QArgs& a, const float* x, int64_t M, int64_t kpad, const float* bias, Elem<YBF>* y,
                 int64_t ldy, int64_t N, int64_t cb0, int64_t cb1) {
    column_blocks(cb0, cb1, N, bias, [&](int64_t cb, int64_t n0, int ncol, const float* b) {
        // up to four activation rows share each decoded weight vector
        row_groups(M, [&](auto mr, int64_t m) {
            q_block_rows<S, decltype(mr)::value, YBF>(a, cb, x + m * kpad, kpad, b, y + m * ldy + n0, ldy, ncol);
        });
    });
}

template <class S>
void q_gemv(const QArgs& a, const float* x, int64_t M, int64_t kpad, const float* bias, void* y, bool ybf,
            int64_t ldy, int64_t N, int64_t cb0, int64_t cb1) {
    if (ybf) q_gemv_rows<S, true>(a, x, M, kpad, bias, static_cast<uint16_t*>(y), ldy, N, cb0, cb1);
    else q_gemv_rows<S, false>(a, x, M, kpad, bias, static_cast<float*>(y), ldy, N, cb0, cb1);
}

template <class S, int B, bool Z>
struct ChunkStore {
    template <int P>
    static EXL_INLINE void step(const int32_t* w, const GroupConsts<kBlock>& g, float* tile) {
        S::store(tile + (P % 16) * kChunkRows + P / 16 * 16, weights<S, B, Z, P, 0>(w, g, P % 16));
    }
    template <int... P>
    static EXL_INLINE void run(const int32_t* w, const GroupConsts<kBlock>& g, float* tile,
                               std::integer_sequence<int, P...>) {
        (step<P>(w, g, tile), ...);
    }
};

template <class S>
void q_dequant(const QArgs& a, const int32_t* src, float* out, int64_t ldo, int64_t cb0, int64_t cb1) {
    constexpr auto seq = std::make_integer_sequence<int, kChunkRows>{};
    alignas(64) float tile[kBlock * kChunkRows];     // column-major: the decoded vectors run along rows
    for (int64_t cb = cb0; cb < cb1; ++cb) {
        GroupConsts<kBlock> g;
        const int32_t* blk = a.qw + cb * a.wtot * kBlock;
        float* o = out + (cb - cb0) * kBlock;
        for (int64_t c = 0; c < a.nchunks; ++c) {
            const int32_t* ch = a.chunks + c * 3;
            const int32_t* w = blk + int64_t(ch[1]) * kBlock;
            set_group<S, kBlock, 0>(g, a, cb, ch[2], ch[0]);
            switch (ch[0]) {
                case 2: ChunkStore<S, 2, true>::run(w, g, tile, seq); break;
                case 3: ChunkStore<S, 3, true>::run(w, g, tile, seq); break;
                case 4: ChunkStore<S, 4, true>::run(w, g, tile, seq); break;
                case 5: ChunkStore<S, 5, true>::run(w, g, tile, seq); break;
                case 6: ChunkStore<S, 6, true>::run(w, g, tile, seq); break;
                default: ChunkStore<S, 8, true>::run(w, g, tile, seq); break;
            }
            const int32_t* sr = src + c * kChunkRows;
            for (int r = 0; r < kChunkRows; ++r) {
                if (sr[r] < 0) continue;
                float* row = o + sr[r] * ldo;
                for (int j = 0; j < kBlock; ++j) row[j] = tile[j * kChunkRows + r];
            }
        }
    }
}

// 16-bit weights: fp16 (F16C's conversion) or bf16
template <class S, bool BF16>
EXL_INLINE typename S::F load_w16(const uint16_t* p) {
    if constexpr (BF16) return S::load_bf(p); else return S::load_h(p);
}

template <class S, bool BF16>
EXL_INLINE float w16_to_float(uint16_t h) {
    if constexpr (BF16) return bf16_to_float(h); else return S::half_to_float(h);
}

// y[i * ldy] = the sum of acc[i]'s lanes + tail(i) for MR accumulators, four sums per transposed reduction
template <class S, bool XBF, int MR, class Tail>
EXL_INLINE void store_sums(const typename S::F* acc, Elem<XBF>* y, int64_t ldy, Tail&& tail) {
    for (int m0 = 0; m0 < MR; m0 += 4) {
        typename S::F t[4];
        for (int i = 0; i < 4; ++i) t[i] = m0 + i < MR ? acc[m0 + i] : S::zero();
        float s[4];
        S::hsum4(t[0], t[1], t[2], t[3], s);
        for (int i = 0; i < 4 && m0 + i < MR; ++i) y[(m0 + i) * ldy] = float_to_elem<XBF>(s[i] + tail(m0 + i));
    }
}

// 16-bit-weight rows, one output row at a time for MR activation rows: the weight is then read as one
// sequential stream, which the hardware prefetcher follows at full bandwidth (several rows at once are
// several short streams, and rows of 1-4 KB read that way run at half the speed; software prefetches only
// get in its way). One accumulator per activation row: its FMA latency still allows ~29 GB/s per core, and
// unrolling over more accumulators measured 10-20% slower on the DRAM stream (Zen 4, both ISA paths).
// XBF: bf16 activations in and out (the bf16 mode's), else float32.
template <class S, bool BF16, bool XBF, int MR>
EXL_INLINE void f16_row(const Elem<XBF>* x, int64_t K, const uint16_t* w, Elem<XBF>* y, int64_t ldy) {
    typename S::F acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = S::zero();
    int64_t k = 0;
    for (; k + kBlock <= K; k += kBlock) {
        typename S::F wv = load_w16<S, BF16>(w + k);
        for (int m = 0; m < MR; ++m) acc[m] = S::fmav(wv, load_elems<S, XBF>(x + m * K + k), acc[m]);
    }
    store_sums<S, XBF, MR>(acc, y, ldy, [&](int i) {
        float s = 0.f;
        for (int64_t kk = k; kk < K; ++kk) s += w16_to_float<S, BF16>(w[kk]) * elem_to_float<XBF>(x[i * K + kk]);
        return s;
    });
}

// f16_rows of bf16 weights and bf16 activations by bf16 dot products, where S::kDotBf16 (dots_avx512bf16.cpp)
template <class S>
void bf16_rows_dots(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t M, int64_t K, int64_t N, int64_t n0,
                    int64_t n1);

template <class S, bool BF16, bool XBF>
void f16_rows(const Elem<XBF>* x, const uint16_t* w, Elem<XBF>* y, int64_t M, int64_t K, int64_t N, int64_t n0,
              int64_t n1) {
    if constexpr (S::kDotBf16 && BF16 && XBF) return bf16_rows_dots<S>(x, w, y, M, K, N, n0, n1);
    for (int64_t n = n0; n < n1; ++n) {
        // later groups of activation rows read the row again from L1
        row_groups(M, [&](auto mr, int64_t m) {
            f16_row<S, BF16, XBF, decltype(mr)::value>(x + m * K, K, w + n * K, y + m * N + n, N);
        });
    }
}

template <class S, bool BF16 = false>
void f16_gemv(const void* x, bool xbf, const uint16_t* w, void* y, int64_t M, int64_t K, int64_t N, int64_t n0,
              int64_t n1) {
    if (xbf)
        f16_rows<S, BF16, true>(static_cast<const uint16_t*>(x), w, static_cast<uint16_t*>(y), M, K, N, n0, n1);
    else
        f16_rows<S, BF16, false>(static_cast<const float*>(x), w, static_cast<float*>(y), M, K, N, n0, n1);
}

// Decode attention (AttnArgs in qkernel.h). A task is a run of kv heads of one batch row. The cache keeps every
// kv head of a position together (rows of Hkv * D elements), so the keys are read in blocks of kKeyBlock
// positions with all the task's heads inside a block: the blocks are one sequential stream (walking one head's
// keys alone, a short read every Hkv * D elements, ran at 3.3 GB/s from DRAM on Zen 4). Per head: the scores of
// its G query heads (each key read once for up to 4 heads), an exact two-pass softmax, then p @ v with up to
// 4 heads x 64 output columns in registers per pass over a block's values. Buffers are kept per thread.
// (kKeyBlock, the block length, is in qkernel.h: paged caches need page sizes that are multiples of it.)
// Each key row read is followed by a prefetch into L2 of the same head's row kPfRows positions ahead (Zen 4, 12
// layers x 640 cold keys: 1.1 ms with a burst of prefetches per block, 0.7 ms spread like this; 32-64 rows ahead
// measured alike, 128 slower).
constexpr int64_t kPfRows = 2 * kKeyBlock;

template <class S, bool BF>
EXL_INLINE typename S::F load_kv(const void* p, int64_t i) {
    return load_elems<S, BF>(static_cast<const Elem<BF>*>(p) + i);
}

template <bool BF>
EXL_INLINE float scalar_kv(const void* p, int64_t i) {
    return elem_to_float<BF>(static_cast<const Elem<BF>*>(p)[i]);
}

template <bool BF>
EXL_INLINE const void* offset(const void* p, int64_t i) {
    if constexpr (BF) return static_cast<const uint16_t*>(p) + i;
    else return static_cast<const float*>(p) + i;
}

// into L2 by hand, spread over the reads (a burst of a block's prefetches stalled the loads behind it): the part
// of row s + kPfRows that this head reads, D elements at p + (s + kPfRows) * rs
template <bool BF>
EXL_INLINE void prefetch_row(const void* p, int64_t s, int64_t rs, int64_t D) {
    const char* row = static_cast<const char*>(offset<BF>(p, (s + kPfRows) * rs));
    for (int64_t b = 0; b < D * int64_t(sizeof(Elem<BF>)); b += 64) __builtin_prefetch(row + b, 0, 1);
}

// sc[g * ld + s] = q[g] . k[s] for NG <= 4 query heads and keys s < ns, q already scaled. With AVX-512's 32
// registers, four keys at a time: each key vector loaded once for all heads, 4 x NG independent FMA chains, and
// each head's four scores from one transposed sum (hsum4) instead of a full reduction per score (attention
// 12-15% faster at 512-1024 keys on Zen 4; the same with AVX2's 16 registers measured 5-10% slower, so AVX2
// keeps one key at a time).
template <class S, bool BF, int NG>
void attn_scores(const float* q, int64_t D, const void* k, int64_t ks, int64_t ns, float* sc, int64_t ld) {
    using F = typename S::F;
    int64_t s = 0;
    if constexpr (S::kAccRegs >= 16) {
        for (; s + 4 <= ns; s += 4) {
            for (int i = 0; i < 4; ++i) prefetch_row<BF>(k, s + i, ks, D);
            F acc[NG][4];
            for (int g = 0; g < NG; ++g)
                for (int i = 0; i < 4; ++i) acc[g][i] = S::zero();
            for (int64_t d = 0; d < D; d += kBlock)
                for (int i = 0; i < 4; ++i) {
                    F kv = load_kv<S, BF>(k, (s + i) * ks + d);
                    for (int g = 0; g < NG; ++g) acc[g][i] = S::fmav(S::load_f(q + g * D + d), kv, acc[g][i]);
                }
            for (int g = 0; g < NG; ++g) {
                float out[4];
                S::hsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3], out);
                for (int i = 0; i < 4; ++i) sc[g * ld + s + i] = out[i];
            }
        }
    }
    for (; s < ns; ++s) {
        prefetch_row<BF>(k, s, ks, D);
        F acc[NG];
        for (int g = 0; g < NG; ++g) acc[g] = S::zero();
        for (int64_t d = 0; d < D; d += kBlock) {
            F kv = load_kv<S, BF>(k, s * ks + d);
            for (int g = 0; g < NG; ++g) acc[g] = S::fmav(S::load_f(q + g * D + d), kv, acc[g]);
        }
        for (int g = 0; g < NG; ++g) sc[g * ld + s] = S::reduce_add(acc[g]);
    }
}

// p = exp(sc - max(sc)) / sum in place
template <class S>
void softmax_row(float* sc, int64_t ns) {
    using F = typename S::F;
    int64_t s = 0;
    F mv = S::set1(-3.0e38f);
    for (; s + kBlock <= ns; s += kBlock) mv = S::max(mv, S::load_f(sc + s));
    float m = S::reduce_max(mv);
    for (; s < ns; ++s) m = sc[s] > m ? sc[s] : m;
    F sum = S::zero(), neg_m = S::set1(-m);
    for (s = 0; s + kBlock <= ns; s += kBlock) {
        F e = S::exp_neg(S::add(S::load_f(sc + s), neg_m));
        S::store(sc + s, e);
        sum = S::add(sum, e);
    }
    if (s < ns) {       // the tail through a padded vector (exp(-1e30) = 0)
        alignas(64) float t[kBlock];
        for (int i = 0; i < kBlock; ++i) t[i] = s + i < ns ? sc[s + i] - m : -1.0e30f;
        F e = S::exp_neg(S::load_f(t));
        S::store(t, e);
        for (int i = 0; s + i < ns; ++i) sc[s + i] = t[i];
        sum = S::add(sum, e);
    }
    const float inv = 1.f / S::reduce_add(sum);
    const F iv = S::set1(inv);
    for (s = 0; s + kBlock <= ns; s += kBlock) S::store(sc + s, S::mul(S::load_f(sc + s), iv));
    for (; s < ns; ++s) sc[s] *= inv;
}

// out[g][d0 .. d0 + 16 NCH) += sum_{s < ns} p[g * ld + s] v[s][d0 ..] for NG <= 4 query heads
template <class S, bool BF, int NCH, int NG>
void attn_values(const float* p, int64_t ld, int64_t ns, const void* v, int64_t vs, int64_t d0, float* out,
                 int64_t D) {
    using F = typename S::F;
    F acc[NG][NCH];
    for (int g = 0; g < NG; ++g)
        for (int c = 0; c < NCH; ++c) acc[g][c] = S::zero();
    for (int64_t s = 0; s < ns; ++s) {
        if (d0 == 0) prefetch_row<BF>(v, s, vs, D);
        F vv[NCH];
        for (int c = 0; c < NCH; ++c) vv[c] = load_kv<S, BF>(v, s * vs + d0 + c * kBlock);
        for (int g = 0; g < NG; ++g) {
            F pb = S::set1(p[g * ld + s]);
            for (int c = 0; c < NCH; ++c) acc[g][c] = S::fmav(pb, vv[c], acc[g][c]);
        }
    }
    for (int g = 0; g < NG; ++g)
        for (int c = 0; c < NCH; ++c) {
            float* o = out + g * D + d0 + c * kBlock;
            S::store(o, S::add(S::load_f(o), acc[g][c]));
        }
}

// f(j, std::integral_constant<int, NG>{}, h) for each of nh kv heads j and its G query heads h .. h + NG - 1, in
// groups of at most 4 with the count a template argument (the kernels' accumulators then stay in registers)
template <class F>
EXL_INLINE void query_groups(int64_t nh, int64_t G, F&& f) {
    for (int64_t j = 0; j < nh; ++j)
        for (int64_t g0 = 0; g0 < G; g0 += 4) {
            switch (G - g0 < 4 ? G - g0 : 4) {
                case 1: f(j, std::integral_constant<int, 1>{}, j * G + g0); break;
                case 2: f(j, std::integral_constant<int, 2>{}, j * G + g0); break;
                case 3: f(j, std::integral_constant<int, 3>{}, j * G + g0); break;
                default: f(j, std::integral_constant<int, 4>{}, j * G + g0); break;
            }
        }
}

// keys s0 .. s0 + n - 1 of nh kv heads (k: key s0 of the first head, key row stride ks) for their nh * G query heads
template <class S, bool BF>
void scores_block(const float* q, const void* k, int64_t ks, int64_t s0, int64_t n, int64_t nh, int64_t G,
                  int64_t D, float* sc, int64_t ns) {
    query_groups(nh, G, [&](int64_t j, auto ng, int64_t h) {
        attn_scores<S, BF, decltype(ng)::value>(q + h * D, D, offset<BF>(k, j * D), ks, n, sc + h * ns + s0, ns);
    });
}

// out[g][..] += p @ v of NG query heads over n keys, 64 and then 16 output columns per pass
template <class S, bool BF, int NG>
void values_heads(const float* p, int64_t ld, int64_t n, const void* v, int64_t vs, float* out, int64_t D) {
    int64_t d0 = 0;
    for (; d0 + 4 * kBlock <= D; d0 += 4 * kBlock) attn_values<S, BF, 4, NG>(p, ld, n, v, vs, d0, out, D);
    for (; d0 < D; d0 += kBlock) attn_values<S, BF, 1, NG>(p, ld, n, v, vs, d0, out, D);
}

template <class S, bool BF>
void values_block(const float* p, const void* v, int64_t vs, int64_t s0, int64_t n, int64_t nh, int64_t G,
                  int64_t D, float* out, int64_t ns) {
    query_groups(nh, G, [&](int64_t j, auto ng, int64_t h) {
        values_heads<S, BF, decltype(ng)::value>(p + h * ns + s0, ns, n, offset<BF>(v, j * D), vs, out + h * D, D);
    });
}

// Where key (value) s0 of kv head j0 of batch b starts in `base` (the keys or the values, row stride rs, batch
// stride bs): in the row itself, or in its page (a block of kKeyBlock keys never crosses a page)
template <bool BF>
EXL_INLINE const void* key_row(const AttnArgs& a, const void* base, int64_t bs, int64_t rs, int64_t b, int64_t j0,
                               int64_t s0) {
    if (!a.pages) return offset<BF>(base, b * bs + s0 * rs + j0 * a.D);
    const int64_t page = a.pages[b * a.pages_stride + s0 / a.page_size];
    return offset<BF>(base, (page * a.page_size + s0 % a.page_size) * rs + j0 * a.D);
}

// attn_span for a bf16 cache by bf16 dot products, where S::kDotBf16 (dots_avx512bf16.cpp defines it)
template <class S>
void attn_span_dots(const AttnArgs& a, int64_t b, int64_t row, int64_t j0, int64_t nh, int64_t ns, float* out,
                    float* sc);

// kv heads j0 .. j0 + nh - 1 of query row `row` (of batch b) over the batch's first ns >= 1 keys in float32
// arithmetic: the scaled queries in q, then the outputs
template <class S, bool BF>
void attn_span_floats(const AttnArgs& a, int64_t b, int64_t row, int64_t j0, int64_t nh, int64_t ns, float* q,
                      float* sc) {
    const int64_t G = a.Hq / a.Hkv, D = a.D, H = nh * G, q0 = row * a.qb + j0 * G * D;
    for (int64_t i = 0; i < H * D; ++i) q[i] = scalar_kv<BF>(a.q, q0 + i) * a.scale;
    for (int64_t s0 = 0; s0 < ns; s0 += kKeyBlock) {
        const int64_t n = ns - s0 < kKeyBlock ? ns - s0 : kKeyBlock;
        scores_block<S, BF>(q, key_row<BF>(a, a.k, a.kb, a.ks, b, j0, s0), a.ks, s0, n, nh, G, D, sc, ns);
    }
    for (int64_t h = 0; h < H; ++h) softmax_row<S>(sc + h * ns, ns);
    for (int64_t i = 0; i < H * D; ++i) q[i] = 0.f;
    for (int64_t s0 = 0; s0 < ns; s0 += kKeyBlock) {
        const int64_t n = ns - s0 < kKeyBlock ? ns - s0 : kKeyBlock;
        values_block<S, BF>(sc, key_row<BF>(a, a.v, a.vb, a.vs, b, j0, s0), a.vs, s0, n, nh, G, D, q, ns);
    }
}

// the outputs of kv heads j0 .. j0 + nh - 1 of query row `row` (of batch b) over the batch's first ns >= 1 keys
// into q (sc: room for the scores)
template <class S, bool BF>
void attn_span(const AttnArgs& a, int64_t b, int64_t row, int64_t j0, int64_t nh, int64_t ns, float* q, float* sc) {
    if constexpr (BF && S::kDotBf16) attn_span_dots<S>(a, b, row, j0, nh, ns, q, sc);
    else attn_span_floats<S, BF>(a, b, row, j0, nh, ns, q, sc);
}

template <class S, bool BF>
void attn_task(const AttnArgs& a, int64_t b, int64_t row, int64_t ns, int64_t j0, int64_t nh,
               std::vector<float>& buf) {
    const int64_t G = a.Hq / a.Hkv, D = a.D, H = nh * G;
    const size_t need = size_t(H * D + H * ns);
    if (buf.size() < need) buf.resize(need);
    float* q = buf.data();               // [H][D]: the scaled queries, then the outputs
    if (ns > 0)
        attn_span<S, BF>(a, b, row, j0, nh, ns, q, q + H * D);
    else                                 // a row that sees no key outputs zeros, as the backends do
        for (int64_t i = 0; i < H * D; ++i) q[i] = 0.f;
    const int64_t q0 = row * a.qb + j0 * G * D;
    for (int64_t i = 0; i < H * D; i += kBlock) {
        if constexpr (BF) S::store_bf(static_cast<uint16_t*>(a.out) + q0 + i, S::load_f(q + i));
        else S::store(static_cast<float*>(a.out) + q0 + i, S::load_f(q + i));
    }
}

// tasks t0 .. t1 - 1 of the B * L * Hkv (query, kv head) pairs, as runs of heads within each query. A batch's L
// queries go in the order 0, L - 1, 1, L - 2, ...: a causal prefill's short and long prefixes alternate, so the
// contiguous runs of tasks the threads take hold equal work.
template <class S>
void attn_decode(const AttnArgs& a, int64_t t0, int64_t t1) {
    thread_local std::vector<float> buf;
    for (int64_t t = t0; t < t1;) {
        const int64_t r = t / a.Hkv, j0 = t % a.Hkv, nh = (t1 - t < a.Hkv - j0 ? t1 - t : a.Hkv - j0);
        const int64_t b = r / a.L, u = r % a.L, i = u % 2 ? a.L - 1 - u / 2 : u / 2;
        const int64_t seen = (a.lens ? a.lens[b] : a.S) - (a.L - 1 - i);
        if (a.bf16) attn_task<S, true>(a, b, b * a.L + i, seen > 0 ? seen : 0, j0, nh, buf);
        else attn_task<S, false>(a, b, b * a.L + i, seen > 0 ? seen : 0, j0, nh, buf);
        t += nh;
    }
}

// RMS norm of rows [r0, r1) of x [rows][D]: y = x * (1 / sqrt(mean(x^2) + eps)) * w (w float32), in float32 as
// ops/norm.py's twin computes it (two roundings of the products, then one to y's dtype).
template <class S, bool BF>
void rms_norm_rows(const Elem<BF>* x, const float* w, Elem<BF>* y, int64_t D, float eps, int64_t r0, int64_t r1) {
    using F = typename S::F;
    for (int64_t r = r0; r < r1; ++r) {
        const Elem<BF>* xr = x + r * D;
        Elem<BF>* yr = y + r * D;
        F acc = S::zero();
        int64_t d = 0;
        for (; d + kBlock <= D; d += kBlock) {
            F v = load_elems<S, BF>(xr + d);
            acc = S::fmav(v, v, acc);
        }
        float ss = S::reduce_add(acc);
        for (int64_t t = d; t < D; ++t) ss += elem_to_float<BF>(xr[t]) * elem_to_float<BF>(xr[t]);
        const float inv = 1.f / std::sqrt(ss / float(D) + eps);
        const F iv = S::set1(inv);
        for (d = 0; d + kBlock <= D; d += kBlock) {
            F out = S::mul(S::mul(load_elems<S, BF>(xr + d), iv), S::load_f(w + d));
            if constexpr (BF) S::store_bf(yr + d, out); else S::store(yr + d, out);
        }
        for (int64_t t = d; t < D; ++t) yr[t] = float_to_elem<BF>(elem_to_float<BF>(xr[t]) * inv * w[t]);
    }
}

template <class S>
void rms_norm(const void* x, bool bf, const float* w, void* y, int64_t D, float eps, int64_t r0, int64_t r1) {
    if (bf) rms_norm_rows<S, true>(static_cast<const uint16_t*>(x), w, static_cast<uint16_t*>(y), D, eps, r0, r1);
    else rms_norm_rows<S, false>(static_cast<const float*>(x), w, static_cast<float*>(y), D, eps, r0, r1);
}

// NeoX RoPE of rows [r0, r1) of x [B * L][H][D]: the first R dims (R even) of each head rotated by row r's cos and
// sin [R] (float32), the rest copied; out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 in float32 as ops/rope.py's twin
// computes them (up to the compiler fusing a product and the sum).
template <class S, bool BF>
void rope_rows(const Elem<BF>* x, const float* cos, const float* sin, Elem<BF>* y, int64_t H, int64_t D, int64_t R,
               int64_t r0, int64_t r1) {
    using F = typename S::F;
    const int64_t half = R / 2;
    for (int64_t r = r0; r < r1; ++r) {
        const float* c = cos + r * R;
        const float* s = sin + r * R;
        for (int64_t h = 0; h < H; ++h) {
            const Elem<BF>* xh = x + (r * H + h) * D;
            Elem<BF>* yh = y + (r * H + h) * D;
            int64_t d = 0;
            for (; d + kBlock <= half; d += kBlock) {
                F x1 = load_elems<S, BF>(xh + d), x2 = load_elems<S, BF>(xh + half + d);
                F o1 = S::add(S::mul(x1, S::load_f(c + d)), S::mul(S::mul(x2, S::set1(-1.f)), S::load_f(s + d)));
                F o2 = S::add(S::mul(x2, S::load_f(c + half + d)), S::mul(x1, S::load_f(s + half + d)));
                if constexpr (BF) { S::store_bf(yh + d, o1); S::store_bf(yh + half + d, o2); }
                else { S::store(yh + d, o1); S::store(yh + half + d, o2); }
            }
            for (; d < half; ++d) {
                const float x1 = elem_to_float<BF>(xh[d]), x2 = elem_to_float<BF>(xh[half + d]);
                yh[d] = float_to_elem<BF>(x1 * c[d] - x2 * s[d]);
                yh[half + d] = float_to_elem<BF>(x2 * c[half + d] + x1 * s[half + d]);
            }
            for (d = R; d < D; ++d) yh[d] = xh[d];
        }
    }
}

template <class S>
void rope_neox(const void* x, bool bf, const float* cos, const float* sin, void* y, int64_t H, int64_t D, int64_t R,
               int64_t r0, int64_t r1) {
    if (bf) rope_rows<S, true>(static_cast<const uint16_t*>(x), cos, sin, static_cast<uint16_t*>(y), H, D, R, r0, r1);
    else rope_rows<S, false>(static_cast<const float*>(x), cos, sin, static_cast<float*>(y), H, D, R, r0, r1);
}

// silu(x) = x e^min(x, 0) / (1 + e^-|x|): both exponents <= 0, the range exp_neg covers, for either sign of x
template <class S, bool BF>
void silu_mul_elems(const Elem<BF>* g, const Elem<BF>* u, Elem<BF>* y, int64_t n) {
    using F = typename S::F;
    int64_t i = 0;
    for (; i + kBlock <= n; i += kBlock) {
        const F x = load_elems<S, BF>(g + i), zero = S::zero();
        const F num = S::mul(x, S::exp_neg(S::min(x, zero)));
        F act = S::div(num, S::add(S::set1(1.f), S::exp_neg(S::min(x, S::mul(x, S::set1(-1.f))))));
        if constexpr (BF) {         // the twin rounds silu's output to bf16 before the product
            alignas(64) uint16_t t[kBlock];
            S::store_bf(t, act);
            act = S::load_bf(t);
            S::store_bf(y + i, S::mul(act, load_elems<S, BF>(u + i)));
        } else {
            S::store(y + i, S::mul(act, load_elems<S, BF>(u + i)));
        }
    }
    for (; i < n; ++i) {
        const float x = elem_to_float<BF>(g[i]);
        const float act = elem_to_float<BF>(float_to_elem<BF>(x / (1.f + std::exp(-x))));
        y[i] = float_to_elem<BF>(act * elem_to_float<BF>(u[i]));
    }
}

template <class S>
void silu_mul(const void* g, const void* u, bool bf, void* y, int64_t n) {
    if (bf) silu_mul_elems<S, true>(static_cast<const uint16_t*>(g), static_cast<const uint16_t*>(u),
                                    static_cast<uint16_t*>(y), n);
    else silu_mul_elems<S, false>(static_cast<const float*>(g), static_cast<const float*>(u), static_cast<float*>(y), n);
}
