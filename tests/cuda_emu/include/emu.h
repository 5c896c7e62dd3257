// A CUDA execution emulator for the CPU, used only by the tests: it runs the kernels under
// exllamav2/exllamav2_ext/cuda/ unchanged (after tests/cuda_emu/mirror.py rewrites the <<<...>>> launches),
// so their indexing, reductions and barriers are checked against the PyTorch twins on machines without a GPU.
//
// Model: a launch runs its blocks one after another; each thread of a block is a fiber (ucontext) on the
// calling OS thread. A fiber runs until it reaches __syncthreads, a warp shuffle or its end; barriers release
// when every live thread of the block (or warp) has arrived, as on sm_70+ where exited threads do not count.
// Warps run one at a time up to the next __syncthreads (see run_block), so a shared-memory access that lacks
// a barrier sees the wrong data and fails the twin comparison. Detected and reported as launch errors:
// deadlocks (threads waiting at different barriers), shuffles whose source lane exited or is at another
// shuffle, and launch sizes a GPU refuses.
// Static __shared__ arrays are function statics, so a block sees what the previous one left there; dynamic
// shared memory is refilled with 0xff bytes (NaN as floats) before each block.
// Not modelled: timing, memory coalescing, alignment faults, contraction of a*b+c into fma (we never fuse).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

struct dim3
{
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint3
{
    unsigned x, y, z;
};

enum cudaError_t
{
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorLaunchFailure = 4,
    cudaErrorInvalidConfiguration = 9,
};
typedef cudaError_t cudaError;

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaDeviceAttr
{
    cudaDevAttrMultiProcessorCount = 16,
};

namespace emu {

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr size_t MAX_SHARED_BYTES = 48 * 1024;     // the default per-block limit of every GPU we target

enum class Wait { none, block, warp, done };

struct Fiber
{
    ucontext_t ctx;
    std::vector<char> stack;
    uint3 tid;
    int lane = 0;
    int warp = 0;
    Wait wait = Wait::none;
    unsigned shuffles = 0;                          // shuffles done so far in this block
};

struct WarpSlots
{
    std::array<uint64_t, 32> value;
    std::array<unsigned, 32> shuffle;               // which shuffle of its lane wrote the value
};

struct State
{
    std::vector<Fiber> fibers;
    ucontext_t scheduler;
    Fiber* cur = nullptr;
    uint3 block_idx{0, 0, 0};
    dim3 block_dim, grid_dim;
    std::function<void()> body;
    std::vector<WarpSlots> slots[2];               // double-buffered by shuffle parity
    std::vector<char> dynamic_smem;
    std::string error;                              // first error of the current launch
    cudaError_t last_error = cudaSuccess;
};

inline State& state()
{
    static State s;
    return s;
}

inline void fail(const std::string& what)
{
    State& s = state();
    if (s.error.empty()) s.error = what;
}

inline void entry()
{
    State& s = state();
    s.body();
    s.cur->wait = Wait::done;
    swapcontext(&s.cur->ctx, &s.scheduler);
}

// Park the current fiber at a barrier and return to the scheduler.
inline void park(Wait w)
{
    State& s = state();
    Fiber* f = s.cur;
    f->wait = w;
    swapcontext(&f->ctx, &s.scheduler);
}

inline void syncthreads() { park(Wait::block); }

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask)
{
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 64 bits");
    State& s = state();
    Fiber* f = s.cur;
    if (mask != 0xffffffffu) fail("shuffle with a partial mask: the emulator models full warps only");
    const unsigned n = f->shuffles++;
    WarpSlots& slot = s.slots[n & 1][f->warp];
    std::memcpy(&slot.value[f->lane], &v, sizeof(T));
    slot.shuffle[f->lane] = n;
    park(Wait::warp);
    const int src = f->lane ^ lane_mask;
    const int base = f->warp * 32;
    if (src >= 32 || base + src >= (int) s.fibers.size() || s.fibers[base + src].shuffles <= n ||
        slot.shuffle[src] != n)
    {
        fail("warp shuffle reads lane " + std::to_string(src) + " of warp " + std::to_string(f->warp) +
             ", which exited or is at another shuffle");
        return v;
    }
    T r;
    std::memcpy(&r, &slot.value[src], sizeof(T));
    return r;
}

// Run warp w until each of its live threads waits at __syncthreads or has exited, releasing its warp
// barriers as they complete. False when its threads wait at different barriers (a deadlock on a GPU).
inline bool run_warp(State& s, size_t w0)
{
    const size_t end = std::min(s.fibers.size(), w0 + 32);
    for (;;)
    {
        for (size_t i = w0; i < end; i++)
        {
            Fiber& f = s.fibers[i];
            if (f.wait != Wait::none) continue;
            s.cur = &f;
            swapcontext(&s.scheduler, &f.ctx);     // runs until its next barrier or its end
        }
        bool at_warp = false, at_block = false;
        for (size_t i = w0; i < end; i++)
        {
            at_warp |= s.fibers[i].wait == Wait::warp;
            at_block |= s.fibers[i].wait == Wait::block;
        }
        if (!at_warp) return true;
        if (at_block) return false;
        for (size_t i = w0; i < end; i++)
            if (s.fibers[i].wait == Wait::warp) s.fibers[i].wait = Wait::none;
    }
}

// Each warp runs as far as it can before the next one starts (or the reverse order with
// CUDA_EMU_SCHEDULE=reverse): the widest skew between warps, so a missing __syncthreads shows up either as a
// read that comes before the write it needs or as a write that lands before an earlier read.
inline void run_block(State& s, bool reverse)
{
    for (Fiber& f : s.fibers)
    {
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, entry, 0);
        f.wait = Wait::none;
        f.shuffles = 0;
    }
    const size_t warps = (s.fibers.size() + 31) / 32;
    for (;;)
    {
        for (size_t k = 0; k < warps; k++)
        {
            if (!run_warp(s, 32 * (reverse ? warps - 1 - k : k)))
            {
                fail("deadlock: threads of one warp wait at different barriers (__syncthreads vs a shuffle)");
                return;
            }
        }
        bool live = false;
        for (Fiber& f : s.fibers)
        {
            live |= f.wait == Wait::block;
            if (f.wait == Wait::block) f.wait = Wait::none;
        }
        if (!live) return;
    }
}

template <typename F>
cudaError_t launch(F&& kernel, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr)
{
    State& s = state();
    s.error.clear();
    const size_t threads = (size_t) block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
        grid.z > 65535 || smem > MAX_SHARED_BYTES)
    {
        std::fprintf(stderr, "cuda_emu: invalid launch configuration grid (%u, %u, %u) block (%u, %u, %u) smem %zu\n",
                     grid.x, grid.y, grid.z, block.x, block.y, block.z, smem);
        s.last_error = cudaErrorInvalidConfiguration;
        return s.last_error;
    }
    s.grid_dim = grid;
    s.block_dim = block;
    s.fibers.resize(threads);
    for (size_t i = 0; i < threads; i++)
    {
        Fiber& f = s.fibers[i];
        if (f.stack.size() != STACK_BYTES) f.stack.assign(STACK_BYTES, 0);
        f.tid = uint3{(unsigned) (i % block.x), (unsigned) (i / block.x % block.y), (unsigned) (i / block.x / block.y)};
        f.lane = (int) (i & 31);
        f.warp = (int) (i >> 5);
    }
    for (auto& p : s.slots) p.assign((threads + 31) / 32, WarpSlots{});
    s.dynamic_smem.assign(smem + 16, 0);
    s.body = [&kernel] { kernel(); };
    const char* schedule = std::getenv("CUDA_EMU_SCHEDULE");
    const bool reverse = schedule && std::string(schedule) == "reverse";
    for (unsigned z = 0; z < grid.z && s.error.empty(); z++)
        for (unsigned y = 0; y < grid.y && s.error.empty(); y++)
            for (unsigned x = 0; x < grid.x && s.error.empty(); x++)
            {
                s.block_idx = uint3{x, y, z};
                // a block starts with garbage in its dynamic shared memory (NaN as floats), not the last block's data
                std::memset(s.dynamic_smem.data(), 0xff, s.dynamic_smem.size());
                run_block(s, reverse);
            }
    if (!s.error.empty())
    {
        std::fprintf(stderr, "cuda_emu: kernel failed in block (%u, %u, %u): %s\n", s.block_idx.x, s.block_idx.y,
                     s.block_idx.z, s.error.c_str());
        s.last_error = cudaErrorLaunchFailure;
    }
    return s.last_error;
}

inline void* dynamic_smem()
{
    // 16-byte aligned like the real thing
    return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(state().dynamic_smem.data()) + 15) & ~uintptr_t(15));
}

}  // namespace emu

#define threadIdx (emu::state().cur->tid)
#define blockIdx (emu::state().block_idx)
#define blockDim (emu::state().block_dim)
#define gridDim (emu::state().grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

inline void __syncthreads() { emu::syncthreads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) { return emu::shfl_xor(mask, v, lane_mask); }

inline float atomicAdd(float* p, float v)
{
    const float old = *p;
    *p = old + v;
    return old;
}

inline cudaError_t cudaGetLastError()
{
    const cudaError_t e = emu::state().last_error;
    emu::state().last_error = cudaSuccess;
    return e;
}

inline const char* cudaGetErrorString(cudaError_t e)
{
    switch (e)
    {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorLaunchFailure: return "unspecified launch failure (emulated; details on stderr)";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    }
    return "unknown error";
}

inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr)
{
    std::memset(p, value, bytes);
    return cudaSuccess;
}

// CUDA_EMU_SMS sets the multiprocessor count the kernels' launch heuristics see (default 4).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int)
{
    if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
    const char* env = std::getenv("CUDA_EMU_SMS");
    *value = env ? std::atoi(env) : 4;
    return cudaSuccess;
}

// CUDA's integer min/max overloads (device code calls them unqualified).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

struct alignas(2) uchar2 { unsigned char x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uchar2 make_uchar2(unsigned char x, unsigned char y) { return uchar2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
