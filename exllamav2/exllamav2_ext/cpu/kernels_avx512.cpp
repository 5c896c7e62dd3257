// The CPU kernels for AVX-512F: 16 lanes in one vector. Only this file is compiled for AVX-512 (by the
// target pragma below, not a command-line flag), and its code runs only where the CPU reports AVX-512F
// (chosen at run time in cpu_ext.cpp), so the library still loads and runs on AVX2-only CPUs.

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "qkernel.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")

namespace exlcpu {
namespace avx512 {

#include "simd_avx512.h"
#include "qkernel_impl.h"

}  // namespace avx512
}  // namespace exlcpu

#pragma GCC pop_options

namespace exlcpu {

const Kernels& kernels_avx512() {
    static const Kernels k{"avx512", &avx512::q_gemv<avx512::S>, &avx512::q_dequant<avx512::S>,
                           &avx512::f16_gemv<avx512::S>, &avx512::q_tables<avx512::S>,
                           &avx512::f16_gemv<avx512::S, true>,
                           &avx512::attn_decode<avx512::S>,
                           &avx512::rms_norm<avx512::S>, &avx512::rope_neox<avx512::S>,
                           &avx512::silu_mul<avx512::S>};
    return k;
}

}  // namespace exlcpu
