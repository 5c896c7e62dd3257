// Stand-in for c10/cuda/CUDAGuard.h in the test emulator: the binding layer runs unchanged on CPU tensors.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {
struct CUDAGuard
{
    explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda

// The bindings accept only "CUDA" tensors; in the emulator CPU memory plays the GPU's part.
#define is_cuda is_cpu
