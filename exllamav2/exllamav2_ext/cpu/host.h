// The host side of the CPU kernels shared by the binding files (cpu_ext.cpp: one op per call; decode_blocks.cpp:
// whole decode blocks per call): the kernel set in use, checked views of the quantized layout, activation gathers.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "qkernel.h"

namespace exlcpu::host {

const Kernels& kernels();

bool float32_or_bf16(const torch::Tensor& x);

// the 16-bit weight kernel for weights of `dtype` (float16 or bfloat16)
F16GemvFn w16_kernel(at::ScalarType dtype);

struct QView {
    QArgs args;
    const int32_t* src;
    int64_t kpad, nblocks;
    bool pairs;       // the pair layout (kernels_avx512bf16.cpp)
};

// A calling thread's buffers for one layer of a call (slot: the layer's index in a call), kept between calls so
// that decode allocates nothing but its outputs
template <class T>
std::vector<T>& slot_buffer(size_t slot) {
    thread_local std::vector<std::vector<T>> bufs;
    if (bufs.size() <= slot) bufs.resize(slot + 1);
    return bufs[slot];
}

inline constexpr size_t kNoTables = SIZE_MAX;

// the layout's tensors checked and viewed (EXL2's indexed scales off the pair layout: their tables built into the
// calling thread's buffers of `slot`, valid until the next call on that slot; none with kNoTables, for a view
// kept across calls that builds them per call)
QView q_view(const torch::Tensor& qw, const torch::Tensor& chunks, const torch::Tensor& scales,
             const std::optional<torch::Tensor>& zeros, const torch::Tensor& src,
             const std::optional<torch::Tensor>& scale_values, bool pairs, size_t slot = 0);
void check_chunks(const torch::Tensor& chunks, int64_t words, int64_t ngroups, std::vector<int8_t>& group_bits);
void build_tables(QArgs& a, const torch::Tensor& values, const std::vector<int8_t>& group_bits, size_t slot);
void check_src(const QView& v, int64_t K);
// a view's N outputs, K inputs (its src) and float32 bias checked (name: the caller's); the bias's data or nullptr
const float* check_layer(const char* name, const QView& v, int64_t N, int64_t K,
                         const std::optional<torch::Tensor>& bias);
int64_t block_grain(int64_t kpad);

// One quantized layer of a call, checked, with its output and gathered activations (few rows: the gemv kernels)
struct QCall {
    QView v;
    const float* bias;
    int64_t N;
    torch::Tensor y;
    const float* xf = nullptr;          // the float32 kernel's activations
    const uint32_t* xp = nullptr;       // the pair kernel's
    const float* xs = nullptr;

    void run(bool xbf, int64_t M, int64_t cb0, int64_t cb1) const {
        if (v.pairs)
            kernels().q_gemv_pairs(v.args, xp, xs, M, v.kpad / 2, bias,
                                   reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), N, N, cb0, cb1);
        else
            kernels().q_gemv(v.args, xf, M, v.kpad, bias, y.data_ptr(), xbf, N, N, cb0, cb1);
    }
};

// x's rows gathered into the layer's padded row order (slot: the calling thread's buffers to use)
void gather_for(QCall& c, const torch::Tensor& x, size_t slot);

// the gathered layers of one input through their gemv kernels in one parallel region, M rows each; their outputs
std::vector<torch::Tensor> run_calls(const std::vector<QCall>& calls, bool xbf, int64_t M);

// the decode attention kernel over B * Hkv tasks, q and out [B][Hq][D] contiguous
void run_attention(AttnArgs& a, const void* q, void* out);

// the pools and tables of a paged decode step checked, each row's new key and value written, `a` pointed at the
// pools with lens (cpu_ext.cpp's attn_decode_paged says how)
void write_paged(const char* name, AttnArgs& a, const void* k_new, const void* v_new, const torch::Tensor& k_pages,
                 const torch::Tensor& v_pages, const torch::Tensor& block_table, const torch::Tensor& seqlens,
                 std::vector<int64_t>& lens);

// decode_blocks.cpp's classes, registered on the extension module
void register_decode_blocks(pybind11::module_& m);

}  // namespace exlcpu::host
