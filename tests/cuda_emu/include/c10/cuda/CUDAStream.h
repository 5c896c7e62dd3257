// Stand-in for c10/cuda/CUDAStream.h in the test emulator: one implicit, synchronous stream.
#pragma once

#include "cuda_runtime.h"

namespace c10::cuda {
struct CUDAStream
{
    cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace c10::cuda
