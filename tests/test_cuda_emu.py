"""The CUDA emulator (tests/cuda_emu) checked on its own, so the kernel tests that run on it cannot pass vacuously.

A handful of small kernels, launched with <<<...>>> and put through the same `rewrite_cuda` as the extension's
sources, are compiled with the emulator's headers into a shared library and called through ctypes on numpy
buffers. Each test pairs a correct kernel (which must give exactly the expected result) with a broken one that
the emulator must expose: a missing __syncthreads gives wrong data, and a deadlock, a shuffle from an exited
lane or a launch a GPU refuses is a launch error, never a hang or a silent pass.
"""

import ctypes
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.cuda_emu import INCLUDE, rewrite_cuda

CXX_FLAGS = ["-O1", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-strict-aliasing",
             "-Wno-unknown-pragmas"]
SUCCESS, LAUNCH_FAILURE, INVALID_CONFIGURATION = 0, 4, 9

SOURCE = r"""
#include <cstdint>
#include <cuda_runtime.h>
#include <cuda_fp16.h>

__device__ float sink[1024];                  // global memory for the kernels that only have to run

// ---- indexing: every thread writes its coordinates at its global linear index -------------------------------
__global__ void index_map(int* out)
{
    const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if (block >= gridDim.x * gridDim.y * gridDim.z || t >= blockDim.x * blockDim.y * blockDim.z) return;
    int* r = out + 12 * (block * blockDim.x * blockDim.y * blockDim.z + t);
    r[0] = threadIdx.x; r[1] = threadIdx.y; r[2] = threadIdx.z;
    r[3] = blockIdx.x;  r[4] = blockIdx.y;  r[5] = blockIdx.z;
    r[6] = blockDim.x;  r[7] = blockDim.y;  r[8] = blockDim.z;
    r[9] = gridDim.x;   r[10] = gridDim.y;  r[11] = gridDim.z;
}

extern "C" int launch_index_map(int* out, int gx, int gy, int gz, int bx, int by, int bz)
{
    index_map<<<dim3(gx, gy, gz), dim3(bx, by, bz)>>>(out);
    return cudaGetLastError();
}

// ---- a block reduction: warp shuffles, then one partial per warp through shared memory -----------------------
template <typename T>
__device__ T warp_sum(T v)
{
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffff, v, m);
    return v;
}

template <typename T, int THREADS>
__global__ void block_sum(const T* in, T* out, int n)
{
    __shared__ T partial[THREADS / 32];
    const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const T* row = in + (size_t) block * n;
    T v = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) v += row[i];
    v = warp_sum(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0)
    {
        v = warp_sum(lane < blockDim.x / 32 ? partial[lane] : T(0));
        if (lane == 0) out[block] = v;
    }
}

extern "C" int launch_block_sum(const float* in, float* out, int n, int gx, int gy, int gz)
{
    block_sum<float, 256><<<dim3(gx, gy, gz), 256, 0, nullptr>>>(in, out, n);
    return cudaGetLastError();
}

// ---- dynamic shared memory: reverse each block's chunk of `count` floats through it ------------------------
__global__ void reverse_chunks(const float* in, float* out, int count, int* aligned)
{
    extern __shared__ float buf[];
    const float* src = in + (size_t) blockIdx.x * count;
    for (int i = threadIdx.x; i < count; i += blockDim.x) buf[i] = src[i];
    __syncthreads();
    for (int i = threadIdx.x; i < count; i += blockDim.x) out[(size_t) blockIdx.x * count + i] = buf[count - 1 - i];
    if (threadIdx.x == 0) aligned[blockIdx.x] = reinterpret_cast<uintptr_t>(buf) % 16 == 0;
}

extern "C" int launch_reverse_chunks(const float* in, float* out, int* aligned, int count, int blocks)
{
    reverse_chunks<<<blocks, 128, count * sizeof(float)>>>(in, out, count, aligned);
    return cudaGetLastError();
}

// ---- races ---------------------------------------------------------------------------------------------------
// Read after write: each thread stores its value, then reads the slot of the same lane one warp on (wrapping).
__global__ void exchange(const float* in, float* out, int sync)
{
    __shared__ float s[256];
    const int t = threadIdx.x, n = blockDim.x, g = blockIdx.x * n + t;
    s[t] = in[g];
    if (sync) __syncthreads();
    out[g] = s[(t + 32) % n];
}

// Write after read: two rounds through the same slots, each thread reading the next warp's slot (the last warp
// its own). The second round's store needs a barrier after the first round's read.
__global__ void two_rounds(const float* in, float* out, int sync)
{
    __shared__ float s[256];
    const int t = threadIdx.x, n = blockDim.x, g = blockIdx.x * n + t;
    const int peer = t + 32 < n ? t + 32 : t;
    s[t] = in[g];
    __syncthreads();
    const float first = s[peer];
    if (sync) __syncthreads();
    s[t] = 2 * in[g];
    __syncthreads();
    out[g] = first + s[peer];
}

extern "C" int launch_exchange(const float* in, float* out, int blocks, int sync)
{
    exchange<<<blocks, 256>>>(in, out, sync);
    return cudaGetLastError();
}

extern "C" int launch_two_rounds(const float* in, float* out, int blocks, int sync)
{
    two_rounds<<<blocks, 256>>>(in, out, sync);
    return cudaGetLastError();
}

// ---- deadlocks: a GPU hangs on these -------------------------------------------------------------------------
// Half of each warp waits at __syncthreads, the other half at a shuffle.
__global__ void split_warp()
{
    float v = threadIdx.x;
    if (threadIdx.x % 32 < 16) __syncthreads();
    else v = __shfl_xor_sync(0xffffffff, v, 1);
    sink[threadIdx.x] = v;
}

// Odd lanes do one more shuffle than even lanes, which meanwhile have reached __syncthreads.
__global__ void uneven_shuffles()
{
    float v = threadIdx.x;
    for (int i = 0; i <= (int) (threadIdx.x & 1); i++) v += __shfl_xor_sync(0xffffffff, v, 2);
    __syncthreads();
    sink[threadIdx.x] = v;
}

extern "C" int launch_split_warp()
{
    split_warp<<<2, 64>>>();
    return cudaGetLastError();
}

extern "C" int launch_uneven_shuffles()
{
    uneven_shuffles<<<2, 64>>>();
    return cudaGetLastError();
}

// ---- a shuffle from an exited lane: in block `bad_block`, lanes 16-31 of the last warp return after `shuffles`
// shuffles, and lanes 0-15 then shuffle with them
__global__ void early_exit(int bad_block, int shuffles)
{
    float v = threadIdx.x;
    for (int i = 0; i < shuffles; i++) v += __shfl_xor_sync(0xffffffff, v, 16);
    if ((int) blockIdx.x == bad_block && threadIdx.x >= blockDim.x - 16) return;
    v += __shfl_xor_sync(0xffffffff, v, 16);
    sink[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

extern "C" int launch_early_exit(int bad_block, int shuffles)
{
    early_exit<<<4, 64>>>(bad_block, shuffles);
    return cudaGetLastError();
}

// ---- launch configuration ------------------------------------------------------------------------------------
__global__ void mark(float* out)
{
    out[threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)] = 1.0f;
}

extern "C" int launch_mark(float* out, int bx, int by, int bz, int smem)
{
    mark<<<1, dim3(bx, by, bz), smem>>>(out);
    return cudaGetLastError();
}

// ---- half precision (grid-stride loops) ----------------------------------------------------------------------
#define GRID_STRIDE(i, n) for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)

__global__ void float2half_kernel(const float* in, unsigned short* out, int n)
{
    GRID_STRIDE(i, n) out[i] = __half_as_ushort(__float2half_rn(in[i]));
}

__global__ void half2float_kernel(const unsigned short* in, float* out, int n)
{
    GRID_STRIDE(i, n) out[i] = __half2float(__ushort_as_half(in[i]));
}

__global__ void hmul_kernel(const unsigned short* a, const unsigned short* b, unsigned short* out, int n)
{
    GRID_STRIDE(i, n) out[i] = __half_as_ushort(__hmul(__ushort_as_half(a[i]), __ushort_as_half(b[i])));
}

extern "C" int launch_float2half(const float* in, unsigned short* out, int n)
{
    float2half_kernel<<<8, 256>>>(in, out, n);
    return cudaGetLastError();
}

extern "C" int launch_half2float(const unsigned short* in, float* out, int n)
{
    half2float_kernel<<<8, 256>>>(in, out, n);
    return cudaGetLastError();
}

extern "C" int launch_hmul(const unsigned short* a, const unsigned short* b, unsigned short* out, int n)
{
    hmul_kernel<<<8, 256>>>(a, b, out, n);
    return cudaGetLastError();
}

// ---- atomics: one counter for every thread of every block, and 8 slots summed across blocks -----------------
__global__ void count(float* counter, float* seen, float* slots)
{
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    seen[g] = atomicAdd(counter, 1.0f);
    atomicAdd(&slots[threadIdx.x % 8], (float) (blockIdx.x + 1));
}

extern "C" int launch_count(float* counter, float* seen, float* slots, int blocks)
{
    count<<<blocks, 256>>>(counter, seen, slots);
    return cudaGetLastError();
}
"""

# wrapper -> (pointer arguments, int arguments after them); every wrapper returns cudaGetLastError()
SIGNATURES = {
    "launch_index_map": (1, 6),
    "launch_block_sum": (2, 4),
    "launch_reverse_chunks": (3, 2),
    "launch_exchange": (2, 2),
    "launch_two_rounds": (2, 2),
    "launch_split_warp": (0, 0),
    "launch_uneven_shuffles": (0, 0),
    "launch_early_exit": (0, 2),
    "launch_mark": (1, 4),
    "launch_float2half": (2, 1),
    "launch_half2float": (2, 1),
    "launch_hmul": (3, 1),
    "launch_count": (3, 1),
}


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    """(ctypes library, its path): SOURCE rewritten for the emulator and compiled once per module."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA emulator")
    root = tmp_path_factory.mktemp("cuda_emu_selftest")
    src, lib = root / "selftest.cpp", root / "libselftest.so"
    src.write_text(rewrite_cuda(SOURCE))
    subprocess.run([cxx, *CXX_FLAGS, "-I", str(INCLUDE), str(src), "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    for name, (pointers, ints) in SIGNATURES.items():
        fn = getattr(dll, name)
        fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int] * ints
        fn.restype = ctypes.c_int
    return dll, lib


@pytest.fixture
def emu(emu_lib, monkeypatch):
    """The compiled kernels, under the default warp schedule (forward) unless a test sets CUDA_EMU_SCHEDULE."""
    monkeypatch.delenv("CUDA_EMU_SCHEDULE", raising=False)
    return emu_lib[0]


def ptr(a):
    return a.ctypes.data


def run_alone(emu_lib, name, timeout=60):
    """(return code, stderr) of one argument-less wrapper run in a fresh process, so a hang fails the test."""
    code = "import ctypes, sys; sys.exit(getattr(ctypes.CDLL(sys.argv[1]), sys.argv[2])())"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_EMU_SCHEDULE"}
    done = subprocess.run([sys.executable, "-c", code, str(emu_lib[1]), name], capture_output=True, text=True,
                          timeout=timeout, env=env)
    return done.returncode, done.stderr


# ---- the harness -------------------------------------------------------------------------------------------------

def test_rewrite_cuda_turns_launches_and_extern_shared_into_emulator_calls():
    text = "extern __shared__ half buf[];\nk<float, 4><<<dim3(a, b), 256, 0, stream>>>(x, f(y, z));"
    assert rewrite_cuda(text) == (
        "half* buf = reinterpret_cast<half*>(emu::dynamic_smem());\n"
        "emu::launch([&] { k<float, 4>(x, f(y, z)); }, dim3(a, b), 256, 0, stream);"
    )


# ---- 1. correct kernels give exactly the expected results --------------------------------------------------------

@pytest.mark.parametrize("grid, block", [((3, 2, 2), (8, 4, 2)), ((2, 1, 3), (256, 1, 1)), ((1, 1, 1), (33, 1, 1))])
def test_thread_and_block_indices(emu, grid, block):
    threads = np.prod(grid) * np.prod(block)
    out = np.full((threads, 12), -1, dtype=np.int32)
    assert emu.launch_index_map(ptr(out), *grid, *block) == SUCCESS
    # x fastest, z slowest, for both the blocks of the grid and the threads of a block
    bz, by, bx, tz, ty, tx = np.meshgrid(*(np.arange(n) for n in grid[::-1] + block[::-1]), indexing="ij")
    expect = np.stack([a.ravel() for a in (tx, ty, tz, bx, by, bz)], axis=1)
    np.testing.assert_array_equal(out[:, :6], expect)
    np.testing.assert_array_equal(out[:, 6:], np.tile(block + grid, (threads, 1)))


@pytest.mark.parametrize("n", [1000, 256, 7])
def test_block_reduction_is_exact(emu, n):
    grid = (3, 2, 2)
    rows = np.random.default_rng(n).integers(-1000, 1000, size=(np.prod(grid), n)).astype(np.float32)
    out = np.full(len(rows), np.nan, dtype=np.float32)
    assert emu.launch_block_sum(ptr(rows), ptr(out), n, *grid) == SUCCESS
    np.testing.assert_array_equal(out, rows.sum(axis=1))      # integers: every order of summation is exact


@pytest.mark.parametrize("count", [100, 12288])                 # 12288 floats: exactly the 48 KiB limit
def test_dynamic_shared_memory(emu, count):
    blocks = 3
    data = np.arange(blocks * count, dtype=np.float32).reshape(blocks, count) + 1
    out = np.zeros_like(data)
    aligned = np.zeros(blocks, dtype=np.int32)
    assert emu.launch_reverse_chunks(ptr(data), ptr(out), ptr(aligned), count, blocks) == SUCCESS
    np.testing.assert_array_equal(out, data[:, ::-1])
    np.testing.assert_array_equal(aligned, 1)


# ---- 2. a missing __syncthreads gives wrong results ------------------------------------------------------------

def _shared_exchange(emu, fn, sync, blocks=4):
    data = np.arange(1, blocks * 256 + 1, dtype=np.float32).reshape(blocks, 256)   # distinct in every block
    out = np.zeros_like(data)
    assert fn(ptr(data), ptr(out), blocks, sync) == SUCCESS
    return data, out


@pytest.mark.parametrize("schedule", [None, "reverse"])
def test_read_before_the_barrier_sees_stale_shared_memory(emu, monkeypatch, schedule):
    if schedule:
        monkeypatch.setenv("CUDA_EMU_SCHEDULE", schedule)
    data, out = _shared_exchange(emu, emu.launch_exchange, sync=1)
    expect = np.roll(data, -32, axis=1)
    np.testing.assert_array_equal(out, expect)
    _, out = _shared_exchange(emu, emu.launch_exchange, sync=0)
    # every block, not just the first one (whose stale data the previous launch left), reads some wrong values
    assert (out != expect).any(axis=1).all(), out


def test_write_before_the_barrier_overwrites_unread_shared_memory(emu, monkeypatch):
    wrong = []
    for schedule in ["forward", "reverse"]:
        monkeypatch.setenv("CUDA_EMU_SCHEDULE", schedule)
        data, out = _shared_exchange(emu, emu.launch_two_rounds, sync=1)
        expect = 3 * np.concatenate([data[:, 32:], data[:, -32:]], axis=1)
        np.testing.assert_array_equal(out, expect, err_msg=f"with the barrier, schedule {schedule}")
        _, out = _shared_exchange(emu, emu.launch_two_rounds, sync=0)
        if (out != expect).any():
            wrong.append(schedule)
    assert wrong, "the write-after-read race went unnoticed under both schedules"


# ---- 3. and 4. deadlocks and shuffles from exited lanes are launch errors --------------------------------------

@pytest.mark.parametrize("name", ["launch_split_warp", "launch_uneven_shuffles"])
def test_deadlock_is_a_launch_error(emu_lib, name):
    rc, err = run_alone(emu_lib, name)
    assert rc == LAUNCH_FAILURE, err
    assert "deadlock" in err


@pytest.mark.parametrize("shuffles_before", [0, 1])
def test_shuffle_from_an_exited_lane_is_a_launch_error(emu, capfd, shuffles_before):
    assert emu.launch_early_exit(-1, shuffles_before) == SUCCESS          # no lane exits early
    assert emu.launch_early_exit(2, shuffles_before) == LAUNCH_FAILURE
    err = capfd.readouterr().err
    assert "block (2, 0, 0)" in err and "exited" in err, err
    assert emu.launch_early_exit(-1, shuffles_before) == SUCCESS          # cudaGetLastError cleared the error


# ---- 5. launches a GPU refuses -----------------------------------------------------------------------------------

@pytest.mark.parametrize("block, smem, rc", [
    ((1024, 1, 1), 0, SUCCESS),
    ((1025, 1, 1), 0, INVALID_CONFIGURATION),
    ((16, 16, 5), 0, INVALID_CONFIGURATION),
    ((32, 1, 1), 48 * 1024, SUCCESS),
    ((32, 1, 1), 48 * 1024 + 1, INVALID_CONFIGURATION),
])
def test_launch_configuration_limits(emu, capfd, block, smem, rc):
    out = np.zeros(np.prod(block), dtype=np.float32)
    assert emu.launch_mark(ptr(out), *block, smem) == rc
    if rc == SUCCESS:
        np.testing.assert_array_equal(out, 1)
    else:
        assert not out.any(), "the kernel ran despite the invalid launch"
        assert "invalid launch configuration" in capfd.readouterr().err


# ---- 6. half precision -----------------------------------------------------------------------------------------

def _half_bits(x):
    with np.errstate(over="ignore"):                    # overflow to infinity is what is being checked
        return np.asarray(x, dtype=np.float16).view(np.uint16)


def test_float2half_rounds_to_nearest_even(emu):
    rng = np.random.default_rng(0)
    tiny, ulp1 = 2.0**-24, 2.0**-10                     # the smallest fp16 subnormal; the fp16 ulp at 1
    special = [0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, -65520, 1e6, 6.1e-5, 2.0**-14, tiny, tiny / 2,
               tiny * 0.5000001, tiny * 1.5, tiny * 2.5, tiny * 3.5, 2.0**-25 * 0.99, 1e-10]
    halfway = [1 + ulp1 / 2, 1 + 3 * ulp1 / 2, 2 - ulp1 / 4, 1024.5, 1025.5, 2049, 2051, 3 * tiny / 2 + 2.0**-14]
    halves = np.arange(0x7c00, dtype=np.uint16).view(np.float16).astype(np.float64)     # every finite half >= 0
    random_bits = rng.integers(0, 2**32, 50_000, dtype=np.uint32).view(np.float32)
    values = np.concatenate([
        np.array(special + halfway, dtype=np.float32),
        -np.array(halfway, dtype=np.float32),
        halves.astype(np.float32),
        ((halves[:-1] + halves[1:]) / 2).astype(np.float32),                   # the ties between neighbours
        # random floats across (and beyond) the fp16 exponent range, signs mixed
        (rng.standard_normal(100_000) * 2.0 ** rng.integers(-30, 20, 100_000)).astype(np.float32),
        random_bits[~np.isnan(random_bits)],
    ])
    out = np.zeros(len(values), dtype=np.uint16)
    assert emu.launch_float2half(ptr(values), ptr(out), len(values)) == SUCCESS
    np.testing.assert_array_equal(out, _half_bits(values))

    nan = np.array([np.nan, -np.nan], dtype=np.float32)
    out = np.zeros(2, dtype=np.uint16)
    assert emu.launch_float2half(ptr(nan), ptr(out), 2) == SUCCESS
    assert np.isnan(out.view(np.float16)).all()


def test_half2float_is_exact_for_every_half(emu):
    bits = np.arange(2**16, dtype=np.uint16)
    out = np.zeros(len(bits), dtype=np.float32)
    assert emu.launch_half2float(ptr(bits), ptr(out), len(bits)) == SUCCESS
    expect = bits.view(np.float16).astype(np.float32)
    finite = ~np.isnan(expect)
    np.testing.assert_array_equal(out.view(np.uint32)[finite], expect.view(np.uint32)[finite])
    assert np.isnan(out[~finite]).all()


def test_hmul_matches_numpy_fp16(emu):
    rng = np.random.default_rng(1)
    n = 200_000
    a = rng.integers(0, 2**16, n, dtype=np.uint16)
    b = rng.integers(0, 2**16, n, dtype=np.uint16)
    # products that land in the subnormal range or overflow, inf * 0, and ties that round up and down to even
    a[:1000] = _half_bits(rng.uniform(-1, 1, 1000) * 2.0**-8)
    b[:1000] = _half_bits(rng.uniform(-1, 1, 1000) * 2.0**-8)
    a[1000:2000] = _half_bits(rng.uniform(200, 400, 1000))
    b[1000:2000] = _half_bits(rng.uniform(200, 400, 1000))
    a[2000:2004] = _half_bits([np.inf, 0, 1 + 2.0**-10, 1 + 3 * 2.0**-10])
    b[2000:2004] = _half_bits([0, -np.inf, 1.5, 1.5])
    out = np.zeros(n, dtype=np.uint16)
    assert emu.launch_hmul(ptr(a), ptr(b), ptr(out), n) == SUCCESS
    with np.errstate(over="ignore", invalid="ignore"):
        expect = a.view(np.float16) * b.view(np.float16)
    nan = np.isnan(expect)
    np.testing.assert_array_equal(out[~nan], expect.view(np.uint16)[~nan])
    assert np.isnan(out[nan].view(np.float16)).all()
    assert nan[2000:2002].all() and nan.sum() > 2
    np.testing.assert_array_equal(out[2002:2004].view(np.float16), [1.5 + 2.0**-9, 1.5 + 4 * 2.0**-10])


# ---- 7. atomics ----------------------------------------------------------------------------------------------------

def test_atomic_add_accumulates_across_blocks(emu):
    blocks = 6
    counter = np.zeros(1, dtype=np.float32)
    seen = np.full(blocks * 256, -1, dtype=np.float32)
    slots = np.full(8, 0.5, dtype=np.float32)
    assert emu.launch_count(ptr(counter), ptr(seen), ptr(slots), blocks) == SUCCESS
    assert counter[0] == blocks * 256
    # atomicAdd returns the old value: every thread saw a different one
    np.testing.assert_array_equal(np.sort(seen), np.arange(blocks * 256))
    np.testing.assert_array_equal(slots, 0.5 + 256 // 8 * sum(range(1, blocks + 1)))
