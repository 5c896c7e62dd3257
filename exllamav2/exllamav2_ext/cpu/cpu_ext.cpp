// Python bindings of the CPU kernels, threading, and the choice of instruction set.
//
// The kernels themselves (kernels_avx2.cpp, kernels_avx512.cpp, one body in qkernel_impl.h) are plain C++;
// this file is compiled for the AVX2 baseline and calls whichever set the CPU runs, chosen once at import
// from the CPU's flags (set_isa() overrides it, e.g. to test the AVX2 path on an AVX-512 CPU).
// Threads: at::parallel_for over output rows / column blocks with torch's thread count (the extension is
// built with -fopenmp, so it shares torch's OpenMP runtime).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "host.h"

namespace exlcpu::host {

std::atomic<const exlcpu::Kernels*> g_kernels{nullptr};

bool cpu_has_avx512() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

bool cpu_has_avx512bf16() {
    __builtin_cpu_init();
    return cpu_has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
}

const exlcpu::Kernels& kernels() { return *g_kernels.load(std::memory_order_relaxed); }

std::string set_isa(const std::string& name) {
    if (name == "auto") {
        g_kernels = cpu_has_avx512bf16() ? &exlcpu::kernels_avx512bf16()
                    : cpu_has_avx512()   ? &exlcpu::kernels_avx512()
                                         : &exlcpu::kernels_avx2();
    } else if (name == "avx2") {
        g_kernels = &exlcpu::kernels_avx2();
    } else if (name == "avx512") {
        TORCH_CHECK(cpu_has_avx512(), "set_isa: this CPU lacks AVX-512F; use 'avx2' or 'auto'");
        g_kernels = &exlcpu::kernels_avx512();
    } else if (name == "avx512bf16") {
        TORCH_CHECK(cpu_has_avx512bf16(), "set_isa: this CPU lacks AVX512-BF16; use 'avx512', 'avx2' or 'auto'");
        g_kernels = &exlcpu::kernels_avx512bf16();
    } else {
        TORCH_CHECK(false, "set_isa: unknown instruction set '", name,
                    "'; expected 'auto', 'avx2', 'avx512' or 'avx512bf16'");
    }
    return kernels().name;
}

std::string isa() { return kernels().name; }

bool has_pair_kernels() { return kernels().q_gemv_pairs != nullptr; }

exlcpu::F16GemvFn w16_kernel(at::ScalarType dtype) {
    return dtype == torch::kFloat16 ? kernels().f16_gemv : kernels().bf16_gemv;
}

// y = x @ w.T for 16-bit weights (fp16 or bf16, `dtype`), each w of `ws` one output; x and y float32 or bfloat16
// (the bf16 mode's activations, taken and returned as they are: no conversions around the call). Several weights
// (q, k and v; gate and up) share one parallel region: rows of all of them split among the threads.
std::vector<torch::Tensor> linear_w16(const char* name, torch::Tensor x, const std::vector<torch::Tensor>& ws,
                                      at::ScalarType dtype, const char* dtype_name) {
    TORCH_CHECK(x.device().is_cpu(), name, ": CPU tensors only");
    const bool xbf = x.scalar_type() == torch::kBFloat16;
    TORCH_CHECK(xbf || x.scalar_type() == torch::kFloat32, name, ": x must be float32 or bfloat16");
    TORCH_CHECK(x.dim() == 2, name, ": x must be (M, K)");
    x = x.contiguous();
    const int64_t M = x.size(0), K = x.size(1);
    std::vector<torch::Tensor> wc, ys;
    std::vector<int64_t> first{0};      // the first row of each weight in the call's numbering
    for (const auto& w : ws) {
        TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == dtype, name, ": w must be ", dtype_name, " on the CPU");
        TORCH_CHECK(w.dim() == 2 && w.size(1) == K, name, ": x (M, K) and w (N, K) must share K");
        wc.push_back(w.contiguous());
        ys.push_back(torch::empty({M, w.size(0)}, x.options()));
        first.push_back(first.back() + w.size(0));
    }
    const auto fn = w16_kernel(dtype);
    const void* xp = x.data_ptr();
    // a thread takes a contiguous run of at least ~32k weights: one sequential stream each
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
    at::parallel_for(0, first.back(), grain, [&](int64_t r0, int64_t r1) {
        for (size_t i = 0; i < wc.size(); ++i) {
            const int64_t lo = std::max(r0, first[i]), hi = std::min(r1, first[i + 1]);
            if (lo < hi)
                fn(xp, xbf, reinterpret_cast<const uint16_t*>(wc[i].data_ptr()), ys[i].data_ptr(), M, K,
                   wc[i].size(0), lo - first[i], hi - first[i]);
        }
    });
    return ys;
}

torch::Tensor linear_f16w(torch::Tensor x, torch::Tensor w) {
    return linear_w16("linear_f16w", x, {w}, torch::kFloat16, "float16")[0];
}

torch::Tensor linear_bf16w(torch::Tensor x, torch::Tensor w) {
    return linear_w16("linear_bf16w", x, {w}, torch::kBFloat16, "bfloat16")[0];
}

std::vector<torch::Tensor> linear_w16_many(torch::Tensor x, const std::vector<torch::Tensor>& ws) {
    TORCH_CHECK(!ws.empty(), "linear_w16_many: no weights");
    const auto dt = ws[0].scalar_type();
    TORCH_CHECK(dt == torch::kFloat16 || dt == torch::kBFloat16, "linear_w16_many: weights must be float16 or bfloat16");
    return linear_w16("linear_w16_many", x, ws, dt, dt == torch::kFloat16 ? "float16" : "bfloat16");
}

// EXL2's indexed scales: each group's 16 scales as floats and their weight tables, built once per call
void build_tables(exlcpu::QArgs& a, const torch::Tensor& values, const std::vector<int8_t>& group_bits,
                  size_t slot) {
    std::vector<float>& buf = slot_buffer<float>(2 * slot);
    const size_t ng = size_t(a.ngroups), tables = ng * 16 * exlcpu::kLutStride;
    if (buf.size() < tables + ng * 16 + 16) buf.resize(tables + ng * 16 + 16);
    // 64-byte aligned: the kernels read the tables with aligned vector loads
    float* gluts = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    float* gscales = gluts + tables;
    kernels().q_tables(reinterpret_cast<const uint16_t*>(values.data_ptr<at::Half>()), group_bits.data(),
                       a.ngroups, gscales, gluts);
    a.gscales = gscales;
    a.gluts = gluts;
}

// the chunk table is trusted only after this check: every chunk's words lie inside a block, and (for the
// per-group tables) every chunk of a group has the group's width
void check_chunks(const torch::Tensor& chunks, int64_t words, int64_t ngroups, std::vector<int8_t>& group_bits) {
    group_bits.assign(size_t(ngroups), 0);
    auto ch = chunks.accessor<int32_t, 2>();
    for (int64_t c = 0; c < chunks.size(0); ++c) {
        const int b = ch[c][0], g = ch[c][2];
        TORCH_CHECK((b >= 2 && b <= 6) || b == 8, "q kernels: chunk ", c, " has bit width ", b);
        TORCH_CHECK(ch[c][1] >= 0 && ch[c][1] + b <= words, "q kernels: chunk ", c, " words out of range");
        TORCH_CHECK(g >= 0 && g < ngroups, "q kernels: chunk ", c, " group out of range");
        TORCH_CHECK(group_bits[g] == 0 || group_bits[g] == b, "q kernels: group ", g, " has two bit widths");
        group_bits[g] = int8_t(b);
    }
}

// scales: fp16 [blocks, groups, 16], or with scale_values (fp16 [groups, 16]) uint8 indices into them
QView q_view(const torch::Tensor& qw, const torch::Tensor& chunks, const torch::Tensor& scales,
             const std::optional<torch::Tensor>& zeros, const torch::Tensor& src,
             const std::optional<torch::Tensor>& scale_values, bool pairs, size_t slot) {
    TORCH_CHECK(!pairs || kernels().q_gemv_pairs, "q kernels: the pair layout needs the avx512bf16 kernels (isa '",
                kernels().name, "')");
    TORCH_CHECK(qw.scalar_type() == torch::kInt32 && qw.dim() == 3 && qw.size(2) == exlcpu::kBlock &&
                qw.is_contiguous(), "q kernels: qw must be contiguous int32 [blocks, words, 16]");
    TORCH_CHECK(chunks.scalar_type() == torch::kInt32 && chunks.dim() == 2 && chunks.size(1) == 3 &&
                chunks.is_contiguous(), "q kernels: chunks must be contiguous int32 [chunks, 3]");
    const int64_t nb = qw.size(0), nc = chunks.size(0);
    const bool indexed = scale_values && scale_values->defined();
    TORCH_CHECK(scales.scalar_type() == (indexed ? torch::kUInt8 : torch::kFloat16) && scales.dim() == 3 &&
                scales.size(0) == nb && scales.size(2) == exlcpu::kBlock && scales.is_contiguous(),
                "q kernels: scales must be contiguous float16 [blocks, groups, 16] (uint8 with scale_values)");
    TORCH_CHECK(src.scalar_type() == torch::kInt32 && src.dim() == 1 && src.size(0) == nc * exlcpu::kChunkRows &&
                src.is_contiguous(), "q kernels: src must be contiguous int32 [chunks * 32]");
    const uint8_t* zp = nullptr;
    if (zeros && zeros->defined()) {
        TORCH_CHECK(!indexed, "q kernels: zero points go with float16 scales, not scale_values");
        TORCH_CHECK(zeros->scalar_type() == torch::kUInt8 && zeros->sizes() == scales.sizes() &&
                    zeros->is_contiguous(), "q kernels: zeros must be contiguous uint8 shaped like scales");
        zp = zeros->data_ptr<uint8_t>();
    }
    thread_local std::vector<int8_t> group_bits;
    check_chunks(chunks, qw.size(1), scales.size(1), group_bits);
    exlcpu::QArgs a{qw.data_ptr<int32_t>(), qw.size(1), chunks.data_ptr<int32_t>(), nc, nullptr, zp, scales.size(1),
                    nullptr, nullptr, nullptr};
    if (indexed) {
        TORCH_CHECK(scale_values->scalar_type() == torch::kFloat16 && scale_values->dim() == 2 &&
                    scale_values->size(0) == scales.size(1) && scale_values->size(1) == 16 &&
                    scale_values->is_contiguous(), "q kernels: scale_values must be contiguous float16 [groups, 16]");
        a.sidx = scales.data_ptr<uint8_t>();
        if (pairs)       // the pair kernels pick each column's value per chunk: no tables
            a.svalues = reinterpret_cast<const uint16_t*>(scale_values->data_ptr<at::Half>());
        else if (slot != kNoTables)
            build_tables(a, *scale_values, group_bits, slot);
    } else {
        a.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
    }
    return {a, src.data_ptr<int32_t>(), nc * exlcpu::kChunkRows, nb, pairs};
}

// column blocks per task: at least ~64k weights, so small layers are not split across threads
int64_t block_grain(int64_t kpad) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(kpad, 1)); }

void dequant_blocks(const QView& v, float* out, int64_t ldo, int64_t cb0, int64_t cb1) {
    auto fn = v.pairs ? kernels().q_dequant_pairs : kernels().q_dequant;
    at::parallel_for(cb0, cb1, block_grain(v.kpad), [&](int64_t b0, int64_t b1) {
        fn(v.args, v.src, out + (b0 - cb0) * exlcpu::kBlock, ldo, b0, b1);
    });
}

// every call (the layout's tensors are arguments): a branch-free min/max pass, then the element named on failure
void check_src(const QView& v, int64_t K) {
    int32_t lo = 0, hi = -1;
    for (int64_t p = 0; p < v.kpad; ++p) {
        lo = std::min(lo, v.src[p]);
        hi = std::max(hi, v.src[p]);
    }
    if (lo >= -1 && hi < K) return;
    for (int64_t p = 0; p < v.kpad; ++p)
        TORCH_CHECK(v.src[p] >= -1 && v.src[p] < K, "q kernels: src[", p, "] = ", v.src[p], " outside -1..", K - 1);
}

const float* check_layer(const char* name, const QView& v, int64_t N, int64_t K,
                         const std::optional<torch::Tensor>& bias) {
    TORCH_CHECK(N > 0 && N <= v.nblocks * exlcpu::kBlock, name, ": N = ", N, " outside 1..", v.nblocks * 16);
    check_src(v, K);
    if (!bias || !bias->defined()) return nullptr;
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->dim() == 1 && bias->size(0) == N &&
                bias->is_contiguous(), name, ": a quantized layer's bias must be contiguous float32 [N]");
    return bias->data_ptr<float>();
}

// x [M, K] (float32 or bf16) as float32 in padded stored-row order (zeros on padding rows)
template <class T>
const float* gather_x(const QView& v, const T* x, int64_t M, int64_t K, size_t slot) {
    std::vector<float>& buf = slot_buffer<float>(2 * slot + 1);
    if (buf.size() < size_t(M * v.kpad)) buf.resize(size_t(M * v.kpad));
    for (int64_t m = 0; m < M; ++m) {
        float* row = buf.data() + m * v.kpad;
        const T* xr = x + m * K;
        for (int64_t p = 0; p < v.kpad; ++p) row[p] = v.src[p] >= 0 ? float(xr[v.src[p]]) : 0.f;
    }
    return buf.data();
}

// The pair kernels' activations: x [M, K] bf16 as bf16 pairs in padded stored-row order (zeros on padding rows)
// and each chunk's sum of them
void gather_pairs(const QView& v, const uint16_t* x, int64_t M, int64_t K, size_t slot, const uint32_t*& pairs,
                  const float*& sums) {
    std::vector<uint16_t>& buf = slot_buffer<uint16_t>(slot);
    std::vector<float>& sbuf = slot_buffer<float>(2 * slot + 1);
    const int64_t nchunks = v.args.nchunks;
    if (buf.size() < size_t(M * v.kpad)) buf.resize(size_t(M * v.kpad));
    if (sbuf.size() < size_t(M * nchunks)) sbuf.resize(size_t(M * nchunks));
    for (int64_t m = 0; m < M; ++m) {
        uint16_t* row = buf.data() + m * v.kpad;
        const uint16_t* xr = x + m * K;
        for (int64_t c = 0; c < nchunks; ++c) {
            float sum = 0.f;
            for (int64_t p = c * exlcpu::kChunkRows; p < (c + 1) * exlcpu::kChunkRows; ++p) {
                const uint16_t e = v.src[p] >= 0 ? xr[v.src[p]] : uint16_t(0);
                row[p] = e;
                const uint32_t u = uint32_t(e) << 16;
                float f;
                std::memcpy(&f, &u, sizeof f);
                sum += f;
            }
            sbuf[size_t(m * nchunks + c)] = sum;
        }
    }
    pairs = reinterpret_cast<const uint32_t*>(buf.data());
    sums = sbuf.data();
}

// Many rows: dequantize a tile of columns (never the whole weight) and multiply it with torch's GEMM, tile by
// tile, in x's dtype: float32 rows take float32 tiles (about 4 MB); bf16 rows take the tile rounded to bf16 (each
// fp16 weight rounded once, as the bf16 mode's 16-bit weights are) and oneDNN's bf16 GEMM, the tile small enough
// (about 2 MB in float32) that the rounding pass reads it from cache.
void q_gemm(const QView& v, const torch::Tensor& x, torch::Tensor& y, int64_t N) {
    const int64_t K = x.size(1);
    const bool xbf = x.scalar_type() == torch::kBFloat16;
    const int64_t budget = int64_t(1) << (xbf ? 19 : 20);
    int64_t cols = std::clamp<int64_t>(budget / std::max<int64_t>(K, 1), 64, v.nblocks * exlcpu::kBlock);
    cols = std::max<int64_t>(exlcpu::kBlock, cols / exlcpu::kBlock * exlcpu::kBlock);
    auto tile = torch::empty({K, cols}, torch::dtype(torch::kFloat32));
    auto wtile = xbf ? torch::empty({K, cols}, x.options()) : tile;
    for (int64_t n0 = 0; n0 < N; n0 += cols) {
        const int64_t nc = std::min(cols, N - n0), cb0 = n0 / exlcpu::kBlock;
        const int64_t cb1 = std::min(v.nblocks, (n0 + nc + exlcpu::kBlock - 1) / exlcpu::kBlock);
        dequant_blocks(v, tile.data_ptr<float>(), cols, cb0, cb1);
        if (xbf) wtile.copy_(tile);
        auto out = y.narrow(1, n0, nc);
        at::mm_out(out, x, wtile.narrow(1, 0, nc));
    }
}

QCall q_call(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& chunks, const torch::Tensor& scales,
             const std::optional<torch::Tensor>& zeros, const torch::Tensor& src,
             const std::optional<torch::Tensor>& bias, int64_t N, const std::optional<torch::Tensor>& scale_values,
             bool pairs, size_t slot) {
    QCall c{q_view(qw, chunks, scales, zeros, src, scale_values, pairs, slot), nullptr, N, torch::Tensor()};
    c.bias = check_layer("q_matmul", c.v, N, x.size(1), bias);
    c.y = torch::empty({x.size(0), N}, x.options());
    return c;
}

void gather_for(QCall& c, const torch::Tensor& x, size_t slot) {
    const int64_t M = x.size(0), K = x.size(1);
    if (c.v.pairs)
        gather_pairs(c.v, reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), M, K, slot, c.xp, c.xs);
    else if (x.scalar_type() == torch::kBFloat16)
        c.xf = gather_x(c.v, x.data_ptr<at::BFloat16>(), M, K, slot);
    else
        c.xf = gather_x(c.v, x.data_ptr<float>(), M, K, slot);
}

std::vector<torch::Tensor> run_calls(const std::vector<QCall>& calls, bool xbf, int64_t M) {
    std::vector<int64_t> first{0};      // the first block of each layer in the region's numbering
    for (const auto& c : calls) first.push_back(first.back() + c.v.nblocks);
    const int64_t grain = calls.empty() ? 1 : block_grain(calls[0].v.kpad);
    at::parallel_for(0, first.back(), grain, [&](int64_t b0, int64_t b1) {
        for (size_t i = 0; i < calls.size(); ++i) {
            const int64_t lo = std::max(b0, first[i]), hi = std::min(b1, first[i + 1]);
            if (lo < hi) calls[i].run(xbf, M, lo - first[i], hi - first[i]);
        }
    });
    std::vector<torch::Tensor> out;
    for (const auto& c : calls) out.push_back(c.y);
    return out;
}

torch::Tensor check_activations(torch::Tensor x) {
    TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32) &&
                x.dim() == 2, "q_matmul: x must be a float32 or bfloat16 CPU tensor [M, K]");
    return x.contiguous();
}

torch::Tensor q_matmul(torch::Tensor x, const torch::Tensor& qw, const torch::Tensor& chunks,
                       const torch::Tensor& scales, const std::optional<torch::Tensor>& zeros,
                       const torch::Tensor& src, const std::optional<torch::Tensor>& bias, int64_t N,
                       int64_t max_gemv_rows, const std::optional<torch::Tensor>& scale_values, bool pairs) {
    x = check_activations(x);
    const bool xbf = x.scalar_type() == torch::kBFloat16;
    QCall c = q_call(x, qw, chunks, scales, zeros, src, bias, N, scale_values, pairs, 0);
    const int64_t M = x.size(0);
    if (M == 0) return c.y;
    if (M > max_gemv_rows || (pairs && !xbf)) {   // decoded tiles and a GEMM in x's dtype
        q_gemm(c.v, x, c.y, N);
        if (c.bias) c.y.add_(*bias);
        return c.y;
    }
    gather_for(c, x, 0);
    at::parallel_for(0, c.v.nblocks, block_grain(c.v.kpad), [&](int64_t b0, int64_t b1) { c.run(xbf, M, b0, b1); });
    return c.y;
}

// Several layers of the same input (q, k and v; gate and up) in one call and one parallel region: each layer as
// q_matmul would take it, a tuple (qw, chunks, scales, zeros, src, bias, N, scale_values, pairs); decode rows only
std::vector<torch::Tensor> q_matmul_many(torch::Tensor x, const std::vector<py::tuple>& layers, int64_t max_gemv_rows) {
    x = check_activations(x);
    const bool xbf = x.scalar_type() == torch::kBFloat16;
    const int64_t M = x.size(0);
    TORCH_CHECK(M >= 1 && M <= max_gemv_rows, "q_matmul_many: 1..", max_gemv_rows, " rows, got ", M);
    auto opt = [](const py::handle& h) {
        return h.is_none() ? std::optional<torch::Tensor>() : std::optional<torch::Tensor>(h.cast<torch::Tensor>());
    };
    std::vector<QCall> calls;
    for (size_t i = 0; i < layers.size(); ++i) {
        const py::tuple& t = layers[i];
        TORCH_CHECK(t.size() == 9, "q_matmul_many: each layer is (qw, chunks, scales, zeros, src, bias, N, "
                    "scale_values, pairs)");
        const bool pairs = t[8].cast<bool>();
        TORCH_CHECK(!pairs || xbf, "q_matmul_many: the pair layout takes bfloat16 activations");
        calls.push_back(q_call(x, t[0].cast<torch::Tensor>(), t[1].cast<torch::Tensor>(), t[2].cast<torch::Tensor>(),
                               opt(t[3]), t[4].cast<torch::Tensor>(), opt(t[5]), t[6].cast<int64_t>(), opt(t[7]),
                               pairs, i));
        gather_for(calls.back(), x, i);
    }
    return run_calls(calls, xbf, M);
}

torch::Tensor q_dequant(const torch::Tensor& qw, const torch::Tensor& chunks, const torch::Tensor& scales,
                        const std::optional<torch::Tensor>& zeros, const torch::Tensor& src, int64_t K,
                        const std::optional<torch::Tensor>& scale_values, bool pairs) {
    QView v = q_view(qw, chunks, scales, zeros, src, scale_values, pairs);
    check_src(v, K);
    const int64_t cols = v.nblocks * exlcpu::kBlock;
    auto out = torch::empty({K, cols}, torch::dtype(torch::kFloat32));
    dequant_blocks(v, out.data_ptr<float>(), cols, 0, v.nblocks);
    return out;
}

// q [B, L, Hq, D] and the keys and values k, v [*, *, Hkv, D] of one call, checked (name: the binding's);
// returns the attention arguments less the cache layout
exlcpu::AttnArgs attn_args(const char* name, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           double scale) {
    TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), name, ": CPU tensors only");
    const auto dt = q.scalar_type();
    TORCH_CHECK((dt == torch::kFloat32 || dt == torch::kBFloat16) && k.scalar_type() == dt && v.scalar_type() == dt,
                name, ": q, k and v must all be float32 or all bfloat16");
    TORCH_CHECK(q.dim() == 4 && q.size(1) >= 1 && k.dim() == 4 && v.sizes() == k.sizes() && k.size(3) == q.size(3),
                name, ": q [B, L, Hq, D], k and v [*, *, Hkv, D] alike");
    const int64_t Hq = q.size(2), D = q.size(3), Hkv = k.size(2);
    TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, name, ": query heads (", Hq, ") not a multiple of kv heads (", Hkv, ")");
    TORCH_CHECK(D % exlcpu::kBlock == 0, name, ": head dim must be a multiple of 16");
    for (const auto* t : {&k, &v})
        TORCH_CHECK(t->stride(3) == 1 && t->stride(2) == D, name, ": k and v need contiguous heads and dims");
    exlcpu::AttnArgs a{nullptr, k.data_ptr(), v.data_ptr(), nullptr, nullptr, q.size(0), Hq, Hkv, D, 0, Hq * D,
                       k.stride(0), k.stride(1), v.stride(0), v.stride(1), float(scale), dt == torch::kBFloat16};
    a.L = q.size(1);
    return a;
}

void run_attention(AttnArgs& a, const void* q, void* out) {
    a.q = q;
    a.out = out;
    auto fn = kernels().attn_decode;
    at::parallel_for(0, a.B * a.L * a.Hkv, 1, [&](int64_t t0, int64_t t1) { fn(a, t0, t1); });
}

torch::Tensor run_attention(exlcpu::AttnArgs& a, const torch::Tensor& q) {
    auto qc = q.contiguous();
    auto out = torch::empty_like(qc);
    run_attention(a, qc.data_ptr(), out.data_ptr());
    return out;
}

// Causal attention of the last positions: q [B, L, Hq, D], k and v [B, S, Hkv, D] (views of the cache: any batch
// and position strides, heads and dims contiguous), all float32 or all bfloat16, D a multiple of 16; row b's
// query i sees its first lengths[b] - (L - 1 - i) keys (lengths int64 [B], 0..S; without lengths all S; a query
// seeing none outputs zeros): a decode step (L = 1) or a prefill whose queries end the keys, no other mask, window
// or softcap. Returns [B, L, Hq, D] in q's dtype, computed in float32.
torch::Tensor attn_decode(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, double scale,
                          const std::optional<torch::Tensor>& lengths) {
    exlcpu::AttnArgs a = attn_args("attn_decode", q, k, v, scale);
    TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) > 0, "attn_decode: k and v [B, S > 0, Hkv, D]");
    a.S = k.size(1);
    if (lengths && lengths->defined()) {
        TORCH_CHECK(lengths->scalar_type() == torch::kInt64 && lengths->dim() == 1 && lengths->size(0) == a.B &&
                    lengths->is_contiguous() && lengths->device().is_cpu(),
                    "attn_decode: lengths must be a contiguous int64 CPU tensor [B]");
        a.lens = lengths->data_ptr<int64_t>();
        for (int64_t b = 0; b < a.B; ++b)
            TORCH_CHECK(a.lens[b] >= 0 && a.lens[b] <= a.S, "attn_decode: lengths[", b, "] = ", a.lens[b],
                        " outside 0..", a.S);
    }
    return run_attention(a, q);
}

// The pools k_pages, v_pages [P, page_size, Hkv, D] and tables of a paged decode step checked against `a` (B rows,
// its heads), each row's new key and value (k_new, v_new: contiguous [B][Hkv][D] in the pools' dtype) written at
// position seqlens[b] through its pages, and `a` pointed at the pools with lens[b] = seqlens[b] + 1 keys
void write_paged(const char* name, AttnArgs& a, const void* k_new, const void* v_new, const torch::Tensor& k_pages,
                 const torch::Tensor& v_pages, const torch::Tensor& block_table, const torch::Tensor& seqlens,
                 std::vector<int64_t>& lens) {
    const int64_t B = a.B, P = k_pages.size(0), page = k_pages.size(1), row = a.Hkv * a.D;
    TORCH_CHECK(k_pages.is_contiguous() && v_pages.is_contiguous() && page > 0 && page % exlcpu::kKeyBlock == 0,
                name, ": the pages must be contiguous [P, page_size, Hkv, D], page_size a multiple of 32");
    TORCH_CHECK(block_table.scalar_type() == torch::kInt32 && block_table.dim() == 2 && block_table.size(0) == B &&
                block_table.is_contiguous() && seqlens.scalar_type() == torch::kInt32 && seqlens.dim() == 1 &&
                seqlens.size(0) == B && seqlens.is_contiguous() && block_table.device().is_cpu() &&
                seqlens.device().is_cpu(),
                name, ": block_table int32 [B, pages per row] and seqlens int32 [B], contiguous, on the CPU");
    const int32_t* bt = block_table.data_ptr<int32_t>();
    const int32_t* sl = seqlens.data_ptr<int32_t>();
    const int64_t per_row = block_table.size(1);
    lens.assign(static_cast<size_t>(B), 0);
    for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(sl[b] >= 0 && sl[b] < per_row * page, name, ": seqlens[", b, "] = ", sl[b], " outside 0..",
                    per_row * page - 1, " (the row's pages)");
        for (int64_t i = 0; i <= sl[b] / page; ++i)
            TORCH_CHECK(bt[b * per_row + i] >= 0 && bt[b * per_row + i] < P, name, ": block_table[", b, ", ", i,
                        "] = ", bt[b * per_row + i], " outside 0..", P - 1);
        lens[size_t(b)] = sl[b] + 1;
        a.S = std::max(a.S, lens[size_t(b)]);
    }
    const size_t esize = k_pages.element_size();
    for (int64_t b = 0; b < B; ++b) {     // the new position's row of each pool
        const int64_t at = (bt[b * per_row + sl[b] / page] * page + sl[b] % page) * row;
        std::memcpy(static_cast<char*>(k_pages.data_ptr()) + at * esize,
                    static_cast<const char*>(k_new) + b * row * esize, row * esize);
        std::memcpy(static_cast<char*>(v_pages.data_ptr()) + at * esize,
                    static_cast<const char*>(v_new) + b * row * esize, row * esize);
    }
    a.lens = lens.data();
    a.pages = bt;
    a.page_size = page;
    a.pages_stride = per_row;
}

// Paged decode attention: the new keys and values k_new, v_new [B, 1, Hkv, D] written at position seqlens[b] of
// each row (int32 [B]) through its pages (block_table int32 [B, pages per row]) into the pools k_pages, v_pages
// [P, page_size, Hkv, D] (contiguous, page_size a multiple of 32), then the query q [B, 1, Hq, D] of row b over
// its seqlens[b] + 1 keys, read from the pages in place. All float32 or all bfloat16; returns [B, 1, Hq, D].
torch::Tensor attn_decode_paged(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new,
                                const torch::Tensor& k_pages, const torch::Tensor& v_pages,
                                const torch::Tensor& block_table, const torch::Tensor& seqlens, double scale) {
    exlcpu::AttnArgs a = attn_args("attn_decode_paged", q, k_pages, v_pages, scale);
    TORCH_CHECK(a.L == 1, "attn_decode_paged: one query per row, q [B, 1, Hq, D]");
    for (const auto* t : {&k_new, &v_new})
        TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->sizes() == torch::IntArrayRef({a.B, 1, a.Hkv, a.D}),
                    "attn_decode_paged: k_new and v_new must be [B, 1, Hkv, D] in q's dtype");
    auto kn = k_new.contiguous(), vn = v_new.contiguous();
    std::vector<int64_t> lens;
    write_paged("attn_decode_paged", a, kn.data_ptr(), vn.data_ptr(), k_pages, v_pages, block_table, seqlens, lens);
    return run_attention(a, q);
}

bool float32_or_bf16(const torch::Tensor& x) {
    return x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16;
}

// The RMS norm over x's last dim with float32 weight w [D]: x float32 or bfloat16, y in its dtype (computed in
// float32 as ops/norm.py's twin)
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
    TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && float32_or_bf16(x) && x.dim() >= 1,
                "rms_norm: x must be a float32 or bfloat16 CPU tensor");
    TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.dim() == 1 && w.size(0) == x.size(-1),
                "rms_norm: w must be float32 [D], D being x's last dim");
    auto xc = x.contiguous();
    auto wc = w.contiguous();
    auto y = torch::empty_like(xc);
    const int64_t D = x.size(-1), rows = D ? xc.numel() / D : 0;
    const bool bf = x.scalar_type() == torch::kBFloat16;
    auto fn = kernels().rms_norm;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
        fn(xc.data_ptr(), bf, wc.data_ptr<float>(), y.data_ptr(), D, float(eps), r0, r1);
    });
    return y;
}

// NeoX rotary embedding of x [B, L, H, D] (float32 or bfloat16) by cos and sin (float32, [B, L, 1, R], R even and
// at most D: the first R dims of each head rotate, the rest are copied); a new tensor in x's dtype
torch::Tensor rope_neox(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
    TORCH_CHECK(x.device().is_cpu() && float32_or_bf16(x) && x.dim() == 4,
                "rope_neox: x must be a float32 or bfloat16 CPU tensor [B, L, H, D]");
    const int64_t rows = x.size(0) * x.size(1), H = x.size(2), D = x.size(3), R = cos.size(-1);
    for (const auto* t : {&cos, &sin})
        TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous() &&
                    t->numel() == rows * R && t->size(-1) == R && R % 2 == 0 && R <= D,
                    "rope_neox: cos and sin must be contiguous float32 [B, L, 1, R], R even and at most D");
    auto xc = x.contiguous();
    auto y = torch::empty_like(xc);
    const bool bf = x.scalar_type() == torch::kBFloat16;
    auto fn = kernels().rope_neox;
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(H * D, 1)), [&](int64_t r0, int64_t r1) {
        fn(xc.data_ptr(), bf, cos.data_ptr<float>(), sin.data_ptr<float>(), y.data_ptr(), H, D, R, r0, r1);
    });
    return y;
}

// y = silu(g) * u, the gated MLP's activation (the decode blocks' kernel): g and u alike, float32 or bfloat16
torch::Tensor silu_mul(const torch::Tensor& g, const torch::Tensor& u) {
    TORCH_CHECK(g.device().is_cpu() && float32_or_bf16(g) && u.scalar_type() == g.scalar_type() &&
                u.sizes() == g.sizes() && u.device().is_cpu(), "silu_mul: g and u must be float32 or bfloat16 CPU "
                "tensors of one shape");
    auto gc = g.contiguous(), uc = u.contiguous();
    auto y = torch::empty_like(gc);
    kernels().silu_mul(gc.data_ptr(), uc.data_ptr(), g.scalar_type() == torch::kBFloat16, y.data_ptr(), y.numel());
    return y;
}

}  // namespace exlcpu::host

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    using namespace exlcpu::host;
    set_isa("auto");
    m.def("linear_f16w", &linear_f16w, "y = x @ w.T, x float32 or bfloat16 (M, K), w float16 (N, K); y in x's dtype");
    m.def("linear_bf16w", &linear_bf16w, "y = x @ w.T, x float32 or bfloat16 (M, K), w bfloat16 (N, K); y in x's dtype");
    m.def("linear_w16_many", &linear_w16_many, "[x @ w.T for w in ws] in one call, the weights all float16 or all "
          "bfloat16 (N_i, K), x float32 or bfloat16 (M, K); each y in x's dtype", py::arg("x"), py::arg("ws"));
    m.def("q_matmul", &q_matmul,
          "y = x @ W (+ bias) for a quantized W in the CPU layout (exllamav2/quant/cpu_layout.py), x float32 or "
          "bfloat16 and y in its dtype (summed in float32); rows above max_gemv_rows go through tiles of dequantized "
          "columns and a GEMM in x's dtype (bf16 rows: the weights rounded to bf16)",
          py::arg("x"), py::arg("qw"), py::arg("chunks"), py::arg("scales"), py::arg("zeros"), py::arg("src"),
          py::arg("bias"), py::arg("N"), py::arg("max_gemv_rows"), py::arg("scale_values") = py::none(),
          py::arg("pairs") = false);
    m.def("q_matmul_many", &q_matmul_many,
          "q_matmul for several layers of one input x [M, K] (M <= max_gemv_rows) in one call: a list of "
          "(qw, chunks, scales, zeros, src, bias, N, scale_values, pairs), one output each",
          py::arg("x"), py::arg("layers"), py::arg("max_gemv_rows"));
    m.def("q_dequant", &q_dequant, "W as float32 [K, blocks * 16] from the CPU layout", py::arg("qw"),
          py::arg("chunks"), py::arg("scales"), py::arg("zeros"), py::arg("src"), py::arg("K"),
          py::arg("scale_values") = py::none(), py::arg("pairs") = false);
    m.def("attn_decode", &attn_decode,
          "causal attention of the last positions: q [B, L, Hq, D], query i of row b over the first lengths[b] - "
          "(L - 1 - i) (lengths default all S) keys of k, v [B, S, Hkv, D] (cache views), float32 or bfloat16, "
          "computed in float32", py::arg("q"), py::arg("k"), py::arg("v"),
          py::arg("scale"), py::arg("lengths") = py::none());
    m.def("attn_decode_paged", &attn_decode_paged,
          "paged decode attention: k_new, v_new [B, 1, Hkv, D] written at position seqlens[b] through block_table "
          "into the page pools k_pages, v_pages [P, page_size, Hkv, D], then q [B, 1, Hq, D] over each row's "
          "seqlens[b] + 1 keys, read from the pages in place; float32 or bfloat16, computed in float32",
          py::arg("q"), py::arg("k_new"), py::arg("v_new"), py::arg("k_pages"), py::arg("v_pages"),
          py::arg("block_table"), py::arg("seqlens"), py::arg("scale"));
    m.def("rms_norm", &rms_norm, "RMS norm over the last dim: x float32 or bfloat16, w float32 [D]; y in x's dtype",
          py::arg("x"), py::arg("w"), py::arg("eps"));
    m.def("rope_neox", &rope_neox, "NeoX RoPE of x [B, L, H, D] (float32 or bfloat16) by float32 cos, sin "
          "[B, L, 1, R]; a new tensor in x's dtype", py::arg("x"), py::arg("cos"), py::arg("sin"));
    m.def("silu_mul", &silu_mul, "silu(g) * u, g and u float32 or bfloat16 alike; silu rounded to their dtype "
          "before the product, as torch's two ops", py::arg("g"), py::arg("u"));
    register_decode_blocks(m);
    m.def("set_isa", &set_isa, "choose the kernels: 'auto' (from the CPU's flags), 'avx2', 'avx512' or "
          "'avx512bf16'; returns it");
    m.def("isa", &isa, "the instruction set the kernels run");
    m.def("has_pair_kernels", &has_pair_kernels,
          "whether the kernels in use run the pair layout (quant/cpu_layout.py, pairs=True)");
}
