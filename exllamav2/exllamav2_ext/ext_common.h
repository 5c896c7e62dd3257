// Argument checks and launch helpers for the ext_*.cpp wrappers. Only the .cpp files see PyTorch types;
// the kernels under cuda/ take raw pointers and a stream.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <optional>

namespace ext {

inline void check_cuda(const at::Tensor& t, const char* name)
{
    TORCH_CHECK(t.is_cuda(), name, " is on ", t.device(),
                "; the exllamav2_ext kernels take CUDA tensors only (the PyTorch path handles other devices)");
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name)
{
    TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

// A CUDA tensor of the given dtype, contiguous, on the same device as `ref`.
inline void check_tensor(const at::Tensor& t, at::ScalarType dtype, const at::Tensor& ref, const char* name)
{
    check_cuda(t, name);
    check_dtype(t, dtype, name);
    TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but the other arguments are on ",
                ref.device());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous; call .contiguous() first");
}

// Kernels load 4- or 16-byte vectors; a view that starts mid-allocation may break that.
inline void check_aligned(const at::Tensor& t, int bytes, const char* name)
{
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0, name, " must start on a ", bytes,
                "-byte boundary (it is a view at an odd offset); pass a fresh tensor");
}

inline void check_launch(cudaError_t err, const char* op)
{
    TORCH_CHECK(err == cudaSuccess, op, " failed: ", cudaGetErrorString(err));
}

inline cudaStream_t stream_of(const at::Tensor& t)
{
    return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

template <typename T>
inline T* ptr(const at::Tensor& t)
{
    return reinterpret_cast<T*>(t.data_ptr());
}

template <typename T>
inline T* ptr(const std::optional<at::Tensor>& t)
{
    return t ? reinterpret_cast<T*>(t->data_ptr()) : nullptr;
}

}  // namespace ext
