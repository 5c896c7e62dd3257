// CPU matrix-vector products with fp16 weights and fp32 activations (AVX2 + F16C + FMA).
//
// Decode on the CPU is bound by reading the weights: keeping them at 16 bits halves the bytes read per
// token, and converting each 8-weight vector to fp32 in registers keeps the arithmetic exact in fp32.
// Only for few rows (decode); many rows (prefill) go to a BLAS GEMM on weights converted by the caller.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

namespace {

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// y[m, n] = sum_k x[m, k] * w[n, k] for one output row n and every m
inline void dot_rows(const float* x, const uint16_t* w, float* y, int64_t M, int64_t K, int64_t N, int64_t n) {
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
            __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 8)));
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr + k), a0);
            a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + k + 8), a1);
        }
        float s = hsum(_mm256_add_ps(a0, a1));
        for (; k < K; ++k) s += _cvtsh_ss(w[k]) * xr[k];
        y[m * N + n] = s;
    }
}

}  // namespace

torch::Tensor linear_f16w(torch::Tensor x, torch::Tensor w) {
    TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "linear_f16w: CPU tensors only");
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "linear_f16w: x must be float32");
    TORCH_CHECK(w.scalar_type() == torch::kFloat16, "linear_f16w: w must be float16");
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
                "linear_f16w: x (M, K) and w (N, K) must share K");
    x = x.contiguous();
    w = w.contiguous();
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    auto y = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::Half>());
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) dot_rows(xp, wp + n * K, yp, M, K, N, n);
    });
    return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("linear_f16w", &linear_f16w, "y = x @ w.T, x float32 (M, K), w float16 (N, K)");
}
