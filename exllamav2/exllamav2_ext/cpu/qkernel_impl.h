// The kernels, written once over a SIMD traits type S (16 lanes: one AVX-512 vector or two AVX2 ones).
// Included by kernels_avx2.cpp and kernels_avx512.cpp inside their own namespace and target region, so
// each instantiation is compiled for its ISA and has its own symbol names.
//
// S provides: I (16 x int32), F (16 x float), load_i, srl<n>, sll<n>, and_i, or_i, sub_i, set1_i, load_u8,
// load_h (16 fp16 -> F), to_f, mul, round_h (round to fp16 and back), fma(F, float, F), zero, store,
// load_f, hsum4 (four F -> four sums).

// (includes <utility> for std::integer_sequence must come before, outside the namespace)

#define EXL_INLINE inline __attribute__((always_inline))

// One dequantized row (16 columns) of a chunk goes to a sink: FMA into accumulators, or a store.
// NA accumulators per activation row, taking rows in turn: one FMA chain would wait on the FMA latency
// (4 cycles) for every row of a one-row decode.
template <class S, int MR>
struct FmaSink {
    static constexpr int NA = MR == 1 ? 4 : MR == 2 ? 2 : 1;
    typename S::F acc[MR][NA];
    const float* x;     // x of the chunk's first row, for MR activation rows kpad apart
    int64_t kpad;
    template <int R>
    EXL_INLINE void put(typename S::F w) {
        for (int r = 0; r < MR; ++r) acc[r][R % NA] = S::fma(w, x[r * kpad + R], acc[r][R % NA]);
    }
    EXL_INLINE typename S::F sum(int r) const {
        typename S::F s = acc[r][0];
        for (int a = 1; a < NA; ++a) s = S::add(s, acc[r][a]);
        return s;
    }
};

template <class S>
struct StoreSink {
    float* out;          // column (cb - cb0) * 16 of the output tile
    int64_t ldo;
    const int32_t* src;  // source row of each of the chunk's 32 rows, -1 for padding
    template <int R>
    EXL_INLINE void put(typename S::F w) {
        if (src[R] >= 0) S::store(out + src[R] * ldo, w);
    }
};

// Row R of a B-bit chunk: the B bits at stream bit R*B of each column, straddling two words for B = 3, 5, 6.
template <class S, int B, int R, class Sink>
EXL_INLINE void chunk_row(const int32_t* w, typename S::F scale, typename S::F zero, Sink& sink) {
    constexpr int pos = R * B, wi = pos / 32, sh = pos % 32;
    typename S::I c = S::template srl<sh>(S::load_i(w + wi * kBlock));
    if constexpr (sh + B > 32) c = S::or_i(c, S::template sll<32 - sh>(S::load_i(w + (wi + 1) * kBlock)));
    c = S::and_i(c, (1 << B) - 1);
    // code - zero exactly, without an int->float conversion: 2^23 + code is the float with code in its low
    // mantissa bits, and `zero` holds 2^23 + zero. Then the exact fp16 weight: the fp32 product of an integer
    // (|.| <= 255) and an fp16 scale is exact, rounded once to fp16.
    sink.template put<R>(S::round_h(S::mul(S::sub(S::magic(c), zero), scale)));
}

template <class S, int B, class Sink, int... R>
EXL_INLINE void chunk_rows(const int32_t* w, typename S::F scale, typename S::F zero, Sink& sink,
                           std::integer_sequence<int, R...>) {
    (chunk_row<S, B, R>(w, scale, zero, sink), ...);
}

template <class S, int B, class Sink>
EXL_INLINE void chunk(const int32_t* w, typename S::F scale, typename S::F zero, Sink& sink) {
    chunk_rows<S, B>(w, scale, zero, sink, std::make_integer_sequence<int, kChunkRows>{});
}

// Every chunk of column block `cb` into `sink`; set_chunk(c) points the sink at chunk c's rows.
template <class S, class Sink, class SetChunk>
EXL_INLINE void each_chunk(const QArgs& a, int64_t cb, Sink& sink, SetChunk set_chunk) {
    const int32_t* blk = a.qw + cb * a.wtot * kBlock;
    const uint16_t* sc = a.scales + cb * a.ngroups * kBlock;
    const uint8_t* zr = a.zeros ? a.zeros + cb * a.ngroups * kBlock : nullptr;
    for (int64_t c = 0; c < a.nchunks; ++c) {
        const int32_t* ch = a.chunks + c * 3;
        const int bits = ch[0];
        const int32_t* w = blk + int64_t(ch[1]) * kBlock;
        const int64_t g = ch[2];
        typename S::F scale = S::load_h(sc + g * kBlock);
        typename S::F zero = zr ? S::magic(S::load_u8(zr + g * kBlock)) : S::set1_f(8388608.f + (1 << (bits - 1)));
        set_chunk(sink, c);
        switch (bits) {
            case 2: chunk<S, 2>(w, scale, zero, sink); break;
            case 3: chunk<S, 3>(w, scale, zero, sink); break;
            case 4: chunk<S, 4>(w, scale, zero, sink); break;
            case 5: chunk<S, 5>(w, scale, zero, sink); break;
            case 6: chunk<S, 6>(w, scale, zero, sink); break;
            default: chunk<S, 8>(w, scale, zero, sink); break;   // bits are checked at load: 2..6 or 8
        }
    }
}

template <class S, int MR>
void q_block_rows(const QArgs& a, int64_t cb, const float* x, int64_t kpad, const float* bias, float* y,
                  int64_t ldy, int ncol) {
    FmaSink<S, MR> sink;
    for (int r = 0; r < MR; ++r)
        for (int a = 0; a < sink.NA; ++a) sink.acc[r][a] = S::zero();
    sink.kpad = kpad;
    each_chunk<S>(a, cb, sink, [x](FmaSink<S, MR>& s, int64_t c) { s.x = x + c * kChunkRows; });
    alignas(64) float tmp[kBlock];
    for (int r = 0; r < MR; ++r) {
        S::store(tmp, sink.sum(r));
        float* yr = y + r * ldy;
        for (int j = 0; j < ncol; ++j) yr[j] = bias ? tmp[j] + bias[j] : tmp[j];
    }
}

template <class S>
void q_gemv(const QArgs& a, const float* x, int64_t M, int64_t kpad, const float* bias, float* y, int64_t ldy,
            int64_t N, int64_t cb0, int64_t cb1) {
    for (int64_t cb = cb0; cb < cb1; ++cb) {
        const int64_t n0 = cb * kBlock;
        if (n0 >= N) break;
        const int ncol = int(N - n0 < kBlock ? N - n0 : kBlock);
        const float* b = bias ? bias + n0 : nullptr;
        int64_t m = 0;
        // four activation rows share each dequantized weight vector
        for (; m + 4 <= M; m += 4) q_block_rows<S, 4>(a, cb, x + m * kpad, kpad, b, y + m * ldy + n0, ldy, ncol);
        switch (M - m) {
            case 3: q_block_rows<S, 3>(a, cb, x + m * kpad, kpad, b, y + m * ldy + n0, ldy, ncol); break;
            case 2: q_block_rows<S, 2>(a, cb, x + m * kpad, kpad, b, y + m * ldy + n0, ldy, ncol); break;
            case 1: q_block_rows<S, 1>(a, cb, x + m * kpad, kpad, b, y + m * ldy + n0, ldy, ncol); break;
            default: break;
        }
    }
}

template <class S>
void q_dequant(const QArgs& a, const int32_t* src, float* out, int64_t ldo, int64_t cb0, int64_t cb1) {
    for (int64_t cb = cb0; cb < cb1; ++cb) {
        StoreSink<S> sink{out + (cb - cb0) * kBlock, ldo, src};
        each_chunk<S>(a, cb, sink, [src](StoreSink<S>& s, int64_t c) { s.src = src + c * kChunkRows; });
    }
}

// fp16-weight rows: four output rows at a time, each with two independent 16-lane accumulators, reduced
// together at the end (one transposed sum for four rows instead of a horizontal sum per row).
template <class S, int NR>
EXL_INLINE void f16_rows(const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n) {
    typename S::F a0[NR], a1[NR];
    for (int r = 0; r < NR; ++r) a0[r] = a1[r] = S::zero();
    int64_t k = 0;
    for (; k + 2 * kBlock <= K; k += 2 * kBlock) {
        typename S::F x0 = S::load_f(x + k), x1 = S::load_f(x + k + kBlock);
        for (int r = 0; r < NR; ++r) {
            // the same line of the next four rows: rows are short streams the hardware prefetcher
            // barely ramps up on
            __builtin_prefetch(w + (4 * NR + r) * K + k);
            a0[r] = S::fmav(S::load_h(w + r * K + k), x0, a0[r]);
            a1[r] = S::fmav(S::load_h(w + r * K + k + kBlock), x1, a1[r]);
        }
    }
    for (; k + kBlock <= K; k += kBlock) {
        typename S::F x0 = S::load_f(x + k);
        for (int r = 0; r < NR; ++r) a0[r] = S::fmav(S::load_h(w + r * K + k), x0, a0[r]);
    }
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (NR == 4) {
        S::hsum4(S::add(a0[0], a1[0]), S::add(a0[1], a1[1]), S::add(a0[2], a1[2]), S::add(a0[3], a1[3]), s);
    } else {
        S::hsum4(S::add(a0[0], a1[0]), S::zero(), S::zero(), S::zero(), s);
    }
    for (; k < K; ++k) {
        for (int r = 0; r < NR; ++r) s[r] += S::half_to_float(w[r * K + k]) * x[k];
    }
    for (int r = 0; r < NR; ++r) y[n + r] = s[r];
}

template <class S>
void f16_gemv(const float* x, const uint16_t* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n0,
              int64_t n1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4)
        for (int64_t m = 0; m < M; ++m) f16_rows<S, 4>(x + m * K, w + n * K, y + m * N, K, N, n);
    for (; n < n1; ++n)
        for (int64_t m = 0; m < M; ++m) f16_rows<S, 1>(x + m * K, w + n * K, y + m * N, K, N, n);
}
