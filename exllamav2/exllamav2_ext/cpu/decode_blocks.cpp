// Whole decode blocks in one call each: the attention block (norm, q/k/v, their q/k norms, RoPE, cache write,
// attention, output projection, residual) and the MLP block (norm, gate/up, SiLU, down, residual) for one new token
// per row, and the decode stack running a decoder's blocks in one call. At the sizes where decode is bound by
// reading the weights, the fifteen-odd Python and dispatcher calls a block makes otherwise cost as much as a fifth
// of the step. The Python path (model/attention.py, model/mlp.py) is their twin: the same kernels in the same order,
// so the two agree bit for bit, save where this SiLU's last float32 bits differ from torch's and move a bf16
// rounding. The projections are checked once, when a block is built.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <variant>
#include <vector>

#include "host.h"

namespace exlcpu::host {
namespace {

bool is_bf16(const torch::Tensor& t) { return t.scalar_type() == torch::kBFloat16; }

// One projection, checked once: the quantized CPU layout (exllamav2/quant/cpu_layout.py) or a 16-bit weight
struct Proj {
    std::vector<torch::Tensor> keep;     // the tensors the view points into (src apart: layers compare theirs)
    QView v{};
    bool quant = false, tables = false;  // tables: EXL2's indexed scales off the pair layout, built per call
    std::vector<int8_t> group_bits;
    torch::Tensor scale_values, w, bias, src;
    int64_t N = 0, K = 0;

    // whether this layer's activations are gathered in o's order, so that o's gather serves it (q, k and v, or
    // gate and up, of one act-order permutation: the converter gives the layers of one input one permutation)
    bool gathers_like(const Proj& o) const {
        return quant && o.quant && v.pairs == o.v.pairs && v.kpad == o.v.kpad && torch::equal(src, o.src);
    }

    static Proj quantized(const torch::Tensor& qw, const torch::Tensor& chunks, const torch::Tensor& scales,
                          const std::optional<torch::Tensor>& zeros, const torch::Tensor& src,
                          const std::optional<torch::Tensor>& bias, int64_t N, int64_t K,
                          const std::optional<torch::Tensor>& scale_values, bool pairs) {
        Proj p;
        p.v = q_view(qw, chunks, scales, zeros, src, scale_values, pairs, kNoTables);
        if (check_layer("DecodeProj", p.v, N, K, bias)) p.bias = *bias;
        p.quant = true;
        p.N = N;
        p.K = K;
        p.keep = {qw, chunks, scales};
        p.src = src;
        if (zeros && zeros->defined()) p.keep.push_back(*zeros);
        if (scale_values && scale_values->defined()) {
            p.scale_values = *scale_values;
            p.tables = !pairs;
            if (p.tables) check_chunks(chunks, qw.size(1), scales.size(1), p.group_bits);
        }
        return p;
    }

    static Proj dense(const torch::Tensor& w, const std::optional<torch::Tensor>& bias) {
        TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous() &&
                    (w.scalar_type() == torch::kFloat16 || w.scalar_type() == torch::kBFloat16),
                    "DecodeProj: w must be a contiguous float16 or bfloat16 CPU tensor [N, K]");
        Proj p;
        p.w = w;
        p.N = w.size(0);
        p.K = w.size(1);
        if (bias && bias->defined()) {
            TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.N && bias->is_contiguous() && float32_or_bf16(*bias),
                        "DecodeProj: bias must be contiguous float32 or bfloat16 [N]");
            p.bias = *bias;
        }
        return p;
    }
};

// y[m, n] += b[n] in y's dtype (bf16: the float sum rounded, as torch's in-place add)
template <class T>
void add_rows(T* y, const T* b, int64_t M, int64_t N) {
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) y[m * N + n] = y[m * N + n] + b[n];
}

void add_bias(torch::Tensor& y, const torch::Tensor& bias) {
    TORCH_CHECK(bias.scalar_type() == y.scalar_type(), "DecodeProj: a 16-bit layer's bias must be in the "
                "activations' dtype");
    if (is_bf16(y))
        add_rows(y.data_ptr<at::BFloat16>(), bias.data_ptr<at::BFloat16>(), y.size(0), y.size(1));
    else
        add_rows(y.data_ptr<float>(), bias.data_ptr<float>(), y.size(0), y.size(1));
}

// For projections of one input: for each, the first of them whose gather serves it (itself where none before does)
std::vector<size_t> gather_sources(const std::vector<const Proj*>& ps) {
    std::vector<size_t> from(ps.size());
    for (size_t i = 0; i < ps.size(); ++i) {
        from[i] = i;
        for (size_t j = 0; j < i && from[i] == i; ++j)
            if (from[j] == j && ps[i]->gathers_like(*ps[j])) from[i] = j;
    }
    return from;
}

// x [M, K] through quantized projections of the same input, in one parallel region (as q_matmul_many); `from`:
// gather_sources(ps), or empty for a gather each
std::vector<torch::Tensor> project_quantized(const std::vector<const Proj*>& ps, const torch::Tensor& x,
                                             const std::vector<size_t>& from) {
    const int64_t M = x.size(0);
    const bool xbf = is_bf16(x);
    std::vector<QCall> calls;
    for (size_t i = 0; i < ps.size(); ++i) {
        const Proj& p = *ps[i];
        TORCH_CHECK(!p.v.pairs || (xbf && kernels().q_gemv_pairs), "decode block: the pair layout takes bfloat16 "
                    "activations and the avx512bf16 kernels (isa '", kernels().name, "')");
        QCall c{p.v, p.bias.defined() ? p.bias.data_ptr<float>() : nullptr, p.N, torch::empty({M, p.N}, x.options())};
        if (p.tables) build_tables(c.v.args, p.scale_values, p.group_bits, i);
        const size_t j = from.empty() ? i : from[i];
        if (j == i) {
            gather_for(c, x, i);
        } else {
            c.xf = calls[j].xf;
            c.xp = calls[j].xp;
            c.xs = calls[j].xs;
        }
        calls.push_back(std::move(c));
    }
    return run_calls(calls, xbf, M);
}

// x [M, K] through 16-bit projections of the same input, in one parallel region (as linear_w16_many)
std::vector<torch::Tensor> project_dense(const std::vector<const Proj*>& ps, const torch::Tensor& x) {
    const int64_t M = x.size(0), K = x.size(1);
    std::vector<torch::Tensor> ys;
    std::vector<int64_t> first{0};
    for (const Proj* p : ps) {
        ys.push_back(torch::empty({M, p->N}, x.options()));
        first.push_back(first.back() + p->N);
    }
    const bool xbf = is_bf16(x);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1));
    at::parallel_for(0, first.back(), grain, [&](int64_t r0, int64_t r1) {
        for (size_t i = 0; i < ps.size(); ++i) {
            const int64_t lo = std::max(r0, first[i]), hi = std::min(r1, first[i + 1]);
            if (lo < hi)
                w16_kernel(ps[i]->w.scalar_type())(x.data_ptr(), xbf,
                                                   reinterpret_cast<const uint16_t*>(ps[i]->w.data_ptr()),
                                                   ys[i].data_ptr(), M, K, ps[i]->N, lo - first[i], hi - first[i]);
        }
    });
    for (size_t i = 0; i < ps.size(); ++i)
        if (ps[i]->bias.defined()) add_bias(ys[i], ps[i]->bias);
    return ys;
}

std::vector<torch::Tensor> project(const std::vector<const Proj*>& ps, const torch::Tensor& x,
                                   const std::vector<size_t>& from = {}) {
    return ps[0]->quant ? project_quantized(ps, x, from) : project_dense(ps, x);
}

// the projections of one input, checked when a block is built: all of one kind, each taking K inputs
void check_group(const char* name, const std::vector<const Proj*>& ps, int64_t K) {
    for (const Proj* p : ps)
        TORCH_CHECK(p->quant == ps[0]->quant && p->K == K, name, ": the projections of one input must all be "
                    "quantized or all 16-bit, each with ", K, " inputs");
}

// x [B, 1, H] (or [B, H]) float32 or bf16 on the CPU as contiguous rows [B, H]
torch::Tensor rows_of(const char* name, const torch::Tensor& x, int64_t H) {
    TORCH_CHECK(x.device().is_cpu() && float32_or_bf16(x) && x.size(-1) == H && x.numel() > 0 &&
                (x.dim() == 2 || (x.dim() == 3 && x.size(1) == 1)),
                name, ": x must be a float32 or bfloat16 CPU tensor [B, 1, ", H, "]");
    TORCH_CHECK(x.size(0) <= 8, name, ": at most 8 rows (decode), got ", x.size(0));
    return x.reshape({x.size(0), H}).contiguous();
}

// RMS norm of contiguous x over each run of w.size(0) features (the hidden size, or a head's: q/k norms)
torch::Tensor rms(const torch::Tensor& x, const torch::Tensor& w, double eps) {
    auto h = torch::empty_like(x);
    const int64_t D = w.size(0);
    kernels().rms_norm(x.data_ptr(), is_bf16(x), w.data_ptr<float>(), h.data_ptr(), D, float(eps), 0,
                       x.numel() / D);
    return h;
}

// x + y in x's dtype, shaped as `like` (bf16: the float sum rounded, as torch.add)
torch::Tensor residual(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& like) {
    auto out = torch::empty_like(x);
    const int64_t n = x.numel();
    if (is_bf16(x)) {
        const auto *a = x.data_ptr<at::BFloat16>(), *b = y.data_ptr<at::BFloat16>();
        auto* o = out.data_ptr<at::BFloat16>();
        for (int64_t i = 0; i < n; ++i) o[i] = a[i] + b[i];
    } else {
        const float *a = x.data_ptr<float>(), *b = y.data_ptr<float>();
        float* o = out.data_ptr<float>();
        for (int64_t i = 0; i < n; ++i) o[i] = a[i] + b[i];
    }
    return out.view(like.sizes());
}

void check_norm(const char* name, const torch::Tensor& w, int64_t H) {
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kFloat32 && w.dim() == 1 && w.size(0) == H &&
                w.is_contiguous(), name, ": the norm weight must be contiguous float32 [", H, "]");
}

struct AttnBlock {
    torch::Tensor norm_w;
    double eps;
    Proj q, k, v, o;
    int64_t Hq, Hkv, D;
    double scale;
    std::optional<torch::Tensor> q_norm, k_norm;     // RMS norms of q and k before RoPE (Qwen3: per head)
    std::vector<size_t> qkv_from;                    // gather_sources of q, k, v

    AttnBlock(torch::Tensor norm_w_, double eps_, Proj q_, Proj k_, Proj v_, Proj o_, int64_t Hq_, int64_t Hkv_,
              int64_t D_, double scale_, std::optional<torch::Tensor> q_norm_, std::optional<torch::Tensor> k_norm_)
        : norm_w(std::move(norm_w_)), eps(eps_), q(std::move(q_)), k(std::move(k_)), v(std::move(v_)),
          o(std::move(o_)), Hq(Hq_), Hkv(Hkv_), D(D_), scale(scale_), q_norm(std::move(q_norm_)),
          k_norm(std::move(k_norm_)) {
        const int64_t H = norm_w.size(0);
        check_norm("AttnDecodeBlock", norm_w, H);
        TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0 && D % kBlock == 0, "AttnDecodeBlock: query heads a multiple of kv "
                    "heads, head dim a multiple of 16");
        check_group("AttnDecodeBlock", {&q, &k, &v}, H);
        qkv_from = gather_sources({&q, &k, &v});
        check_group("AttnDecodeBlock", {&o}, Hq * D);
        TORCH_CHECK(q.N == Hq * D && k.N == Hkv * D && v.N == Hkv * D && o.N == H,
                    "AttnDecodeBlock: projection sizes do not match the heads");
        TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "AttnDecodeBlock: q and k norms go together");
        if (q_norm) {
            check_norm("AttnDecodeBlock q_norm", *q_norm, q_norm->size(0) == D ? D : Hq * D);
            check_norm("AttnDecodeBlock k_norm", *k_norm, k_norm->size(0) == D ? D : Hkv * D);
        }
    }

    // the new token of each row at position `past` of the dense cache k_cache, v_cache [batch, S, Hkv, D]
    torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& kc, const torch::Tensor& vc, int64_t past,
                          const std::optional<torch::Tensor>& cos, const std::optional<torch::Tensor>& sin) const {
        const torch::Tensor x2 = rows_of("AttnDecodeBlock", x, o.N);
        const int64_t B = x2.size(0);
        for (const auto* c : {&kc, &vc})
            TORCH_CHECK(fits_cache(*c, x2) && c->size(0) >= B && past >= 0 && past < c->size(1),
                        "AttnDecodeBlock: the cache must be [>= B, > past, Hkv, D] in x's dtype, heads contiguous");
        const auto qkv = rotated_qkv(x2, cos, sin);
        const size_t row = size_t(Hkv * D) * x2.element_size();
        for (int64_t b = 0; b < B; ++b) {
            const int64_t at = (b * kc.stride(0) + past * kc.stride(1)) * kc.element_size();
            const int64_t vat = (b * vc.stride(0) + past * vc.stride(1)) * vc.element_size();
            std::memcpy(static_cast<char*>(kc.data_ptr()) + at, static_cast<const char*>(qkv[1].data_ptr()) + b * row,
                        row);
            std::memcpy(static_cast<char*>(vc.data_ptr()) + vat, static_cast<const char*>(qkv[2].data_ptr()) + b * row,
                        row);
        }
        AttnArgs a = args(B, kc, vc, is_bf16(x2));
        a.S = past + 1;
        a.kb = kc.stride(0);
        a.vb = vc.stride(0);
        return attend(a, x2, qkv[0], x);
    }

    // the new token of row b at position seqlens[b] of its pages (block_table) in the pools [P, page_size, Hkv, D]
    torch::Tensor forward_paged(const torch::Tensor& x, const torch::Tensor& k_pages, const torch::Tensor& v_pages,
                                const torch::Tensor& block_table, const torch::Tensor& seqlens,
                                const std::optional<torch::Tensor>& cos,
                                const std::optional<torch::Tensor>& sin) const {
        const torch::Tensor x2 = rows_of("AttnDecodeBlock", x, o.N);
        for (const auto* c : {&k_pages, &v_pages})
            TORCH_CHECK(fits_cache(*c, x2), "AttnDecodeBlock: the pages must be [P, page_size, Hkv, D] in x's dtype");
        const auto qkv = rotated_qkv(x2, cos, sin);
        AttnArgs a = args(x2.size(0), k_pages, v_pages, is_bf16(x2));
        std::vector<int64_t> lens;
        write_paged("AttnDecodeBlock", a, qkv[1].data_ptr(), qkv[2].data_ptr(), k_pages, v_pages, block_table, seqlens,
                    lens);
        return attend(a, x2, qkv[0], x);
    }

private:
    bool fits_cache(const torch::Tensor& c, const torch::Tensor& x2) const {
        return c.device().is_cpu() && c.scalar_type() == x2.scalar_type() && c.dim() == 4 && c.size(2) == Hkv &&
               c.size(3) == D && c.stride(3) == 1 && c.stride(2) == D;
    }

    AttnArgs args(int64_t B, const torch::Tensor& k, const torch::Tensor& v, bool bf) const {
        return {nullptr, k.data_ptr(), v.data_ptr(), nullptr, nullptr, B, Hq, Hkv, D, 0, Hq * D, 0, k.stride(1), 0,
                v.stride(1), float(scale), bf};
    }

    // q, k and v of the normed rows, q and k normed where the layer does, then rotated (NeoX) by cos, sin
    // [B, 1, 1, R] where given
    std::vector<torch::Tensor> rotated_qkv(const torch::Tensor& x2, const std::optional<torch::Tensor>& cos,
                                           const std::optional<torch::Tensor>& sin) const {
        auto qkv = project({&q, &k, &v}, rms(x2, norm_w, eps), qkv_from);
        if (q_norm) {
            qkv[0] = rms(qkv[0], *q_norm, eps);
            qkv[1] = rms(qkv[1], *k_norm, eps);
        }
        TORCH_CHECK(cos.has_value() == sin.has_value(), "AttnDecodeBlock: cos and sin go together");
        if (!cos) return qkv;
        const int64_t B = x2.size(0), R = cos->size(-1);
        for (const auto* t : {&*cos, &*sin})
            TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous() && t->numel() == B * R &&
                        R % 2 == 0 && R <= D, "AttnDecodeBlock: cos and sin must be contiguous float32 [B, 1, 1, R]");
        const int64_t heads[2] = {Hq, Hkv};
        for (int i = 0; i < 2; ++i) {
            auto r = torch::empty_like(qkv[i]);
            kernels().rope_neox(qkv[i].data_ptr(), is_bf16(x2), cos->data_ptr<float>(), sin->data_ptr<float>(),
                                r.data_ptr(), heads[i], D, R, 0, B);
            qkv[i] = r;
        }
        return qkv;
    }

    // x + o_proj(attention of the rotated queries qr by `a`), shaped as `like`
    torch::Tensor attend(AttnArgs& a, const torch::Tensor& x2, const torch::Tensor& qr,
                         const torch::Tensor& like) const {
        auto att = torch::empty({x2.size(0), Hq * D}, x2.options());
        run_attention(a, qr.data_ptr(), att.data_ptr());
        return residual(x2, project({&o}, att)[0], like);
    }
};

struct MlpBlock {
    torch::Tensor norm_w;
    double eps;
    Proj gate, up, down;
    std::vector<size_t> gate_up_from;       // gather_sources of gate, up

    MlpBlock(torch::Tensor norm_w_, double eps_, Proj gate_, Proj up_, Proj down_)
        : norm_w(std::move(norm_w_)), eps(eps_), gate(std::move(gate_)), up(std::move(up_)), down(std::move(down_)) {
        const int64_t H = norm_w.size(0);
        check_norm("MlpDecodeBlock", norm_w, H);
        check_group("MlpDecodeBlock", {&gate, &up}, H);
        gate_up_from = gather_sources({&gate, &up});
        check_group("MlpDecodeBlock", {&down}, gate.N);
        TORCH_CHECK(up.N == gate.N && down.N == H, "MlpDecodeBlock: gate and up must have one width, down H outputs");
    }

    torch::Tensor forward(const torch::Tensor& x) const {
        const torch::Tensor x2 = rows_of("MlpDecodeBlock", x, down.N);
        auto gu = project({&gate, &up}, rms(x2, norm_w, eps), gate_up_from);
        auto act = torch::empty_like(gu[0]);
        kernels().silu_mul(gu[0].data_ptr(), gu[1].data_ptr(), is_bf16(x2), act.data_ptr(), act.numel());
        return residual(x2, project({&down}, act)[0], x);
    }
};

// The final RMS norm and the head of decode rows: logits in x's dtype, shaped [B, 1, V] (or [B, V] as x)
struct HeadBlock {
    torch::Tensor norm_w;
    double eps;
    Proj head;

    HeadBlock(torch::Tensor norm_w_, double eps_, Proj head_)
        : norm_w(std::move(norm_w_)), eps(eps_), head(std::move(head_)) {
        check_norm("DecodeHead", norm_w, norm_w.size(0));
        check_group("DecodeHead", {&head}, norm_w.size(0));
    }

    torch::Tensor forward(const torch::Tensor& x) const {
        const torch::Tensor x2 = rows_of("DecodeHead", x, head.K);
        const auto y = project({&head}, rms(x2, norm_w, eps))[0];
        return x.dim() == 3 ? y.view({x2.size(0), 1, head.N}) : y;
    }
};

// A decoder's blocks in order, one call per decode step: the per-layer calls from Python cost about 5% of a step at
// 1 thread, more at 2 (they do not run in parallel)
struct DecodeStack {
    using Block = std::variant<std::shared_ptr<AttnBlock>, std::shared_ptr<MlpBlock>>;
    std::vector<Block> blocks;
    std::vector<bool> rope;         // per block: whether its attention rotates q and k (NoPE layers do not)
    size_t attention = 0;           // how many of the blocks are attention blocks
    std::shared_ptr<HeadBlock> head;    // the final norm and head, for calls that ask for logits (or null)

    DecodeStack(std::vector<Block> blocks_, std::vector<bool> rope_, std::shared_ptr<HeadBlock> head_)
        : blocks(std::move(blocks_)), rope(std::move(rope_)), head(std::move(head_)) {
        TORCH_CHECK(!blocks.empty() && rope.size() == blocks.size(), "DecodeStack: one rope flag per block");
        for (const auto& b : blocks) attention += std::holds_alternative<std::shared_ptr<AttnBlock>>(b);
    }

    torch::Tensor forward(torch::Tensor x, const std::vector<torch::Tensor>& kc, const std::vector<torch::Tensor>& vc,
                          int64_t past, const std::optional<torch::Tensor>& cos,
                          const std::optional<torch::Tensor>& sin, bool logits) const {
        check_caches(kc.size(), vc.size(), logits);
        return run(std::move(x), logits, [&](const AttnBlock& b, const torch::Tensor& h, size_t i, bool r) {
            return b.forward(h, kc[i], vc[i], past, r ? cos : std::nullopt, r ? sin : std::nullopt);
        });
    }

    torch::Tensor forward_paged(torch::Tensor x, const std::vector<torch::Tensor>& kp,
                                const std::vector<torch::Tensor>& vp, const torch::Tensor& block_table,
                                const torch::Tensor& seqlens, const std::optional<torch::Tensor>& cos,
                                const std::optional<torch::Tensor>& sin, bool logits) const {
        check_caches(kp.size(), vp.size(), logits);
        return run(std::move(x), logits, [&](const AttnBlock& b, const torch::Tensor& h, size_t i, bool r) {
            return b.forward_paged(h, kp[i], vp[i], block_table, seqlens, r ? cos : std::nullopt,
                                   r ? sin : std::nullopt);
        });
    }

private:
    void check_caches(size_t k, size_t v, bool logits) const {
        TORCH_CHECK(k == attention && v == attention, "DecodeStack: one key and one value cache per attention block (",
                    attention, ")");
        TORCH_CHECK(!logits || head, "DecodeStack: logits asked of a stack built without a head");
    }

    // the blocks over x, then the head where logits are asked for
    template <class Attend>
    torch::Tensor run(torch::Tensor x, bool logits, const Attend& attend) const {
        size_t a = 0;
        for (size_t i = 0; i < blocks.size(); ++i) {
            if (const auto* ab = std::get_if<std::shared_ptr<AttnBlock>>(&blocks[i]))
                x = attend(**ab, x, a++, rope[i]);
            else
                x = std::get<std::shared_ptr<MlpBlock>>(blocks[i])->forward(x);
        }
        return logits ? head->forward(x) : x;
    }
};

}  // namespace

void register_decode_blocks(pybind11::module_& m) {
    namespace py = pybind11;
    py::class_<Proj>(m, "DecodeProj", "one projection of a decode block, checked once")
        .def_static("quantized", &Proj::quantized, "a layer in the CPU layout (q_matmul's arguments, K its inputs)",
                    py::arg("qw"), py::arg("chunks"), py::arg("scales"), py::arg("zeros"), py::arg("src"),
                    py::arg("bias"), py::arg("N"), py::arg("K"), py::arg("scale_values"), py::arg("pairs"))
        .def_static("dense", &Proj::dense, "16-bit weights w [N, K] (float16 or bfloat16), bias in the activations' "
                    "dtype", py::arg("w"), py::arg("bias"));
    py::class_<AttnBlock, std::shared_ptr<AttnBlock>>(m, "AttnDecodeBlock",
                                                      "the attention block of one decode token per row")
        .def(py::init<torch::Tensor, double, Proj, Proj, Proj, Proj, int64_t, int64_t, int64_t, double,
                      std::optional<torch::Tensor>, std::optional<torch::Tensor>>(),
             py::arg("norm_weight"), py::arg("eps"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"),
             py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("scale"),
             py::arg("q_norm") = py::none(), py::arg("k_norm") = py::none())
        .def("forward", &AttnBlock::forward, "x [B, 1, H] + attention of its token at position `past` of the "
             "cache [batch, S, Hkv, D] (written there), NeoX RoPE by cos, sin [B, 1, 1, R] where given",
             py::arg("x"), py::arg("k_cache"), py::arg("v_cache"), py::arg("past"), py::arg("cos"), py::arg("sin"))
        .def("forward_paged", &AttnBlock::forward_paged, "x [B, 1, H] + attention of row b's token at position "
             "seqlens[b] of its pages (block_table int32 [B, pages per row]) in the pools [P, page_size, Hkv, D] "
             "(written there), NeoX RoPE by cos, sin [B, 1, 1, R] where given", py::arg("x"), py::arg("k_pages"),
             py::arg("v_pages"), py::arg("block_table"), py::arg("seqlens"), py::arg("cos"), py::arg("sin"));
    py::class_<MlpBlock, std::shared_ptr<MlpBlock>>(m, "MlpDecodeBlock", "the gated SiLU MLP block of decode rows")
        .def(py::init<torch::Tensor, double, Proj, Proj, Proj>(), py::arg("norm_weight"), py::arg("eps"),
             py::arg("gate"), py::arg("up"), py::arg("down"))
        .def("forward", &MlpBlock::forward, "x [B, 1, H] + the MLP of its RMS-normed rows", py::arg("x"));
    py::class_<HeadBlock, std::shared_ptr<HeadBlock>>(m, "DecodeHead", "the final RMS norm and head of decode rows")
        .def(py::init<torch::Tensor, double, Proj>(), py::arg("norm_weight"), py::arg("eps"), py::arg("head"))
        .def("forward", &HeadBlock::forward, "x [B, 1, H] -> the head of its RMS-normed rows [B, 1, V]", py::arg("x"));
    py::class_<DecodeStack>(m, "DecodeStack", "a decoder's attention and MLP blocks in order, one call per step")
        .def(py::init<std::vector<DecodeStack::Block>, std::vector<bool>, std::shared_ptr<HeadBlock>>(),
             py::arg("blocks"), py::arg("rope"), py::arg("head") = py::none())
        .def("forward", &DecodeStack::forward, "the blocks in order over x [B, 1, H]: attention block i with the "
             "dense caches k_caches[i], v_caches[i] (as AttnDecodeBlock.forward), cos and sin for the blocks that "
             "rotate; then, with logits, the head", py::arg("x"), py::arg("k_caches"), py::arg("v_caches"),
             py::arg("past"), py::arg("cos"), py::arg("sin"), py::arg("logits") = false)
        .def("forward_paged", &DecodeStack::forward_paged, "the blocks in order over x [B, 1, H], attention block i "
             "through the page pools k_pages[i], v_pages[i] (as AttnDecodeBlock.forward_paged); then, with logits, "
             "the head", py::arg("x"), py::arg("k_pages"), py::arg("v_pages"), py::arg("block_table"),
             py::arg("seqlens"), py::arg("cos"), py::arg("sin"), py::arg("logits") = false);
}

}  // namespace exlcpu::host
