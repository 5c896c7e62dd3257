// Stand-in for cuda_fp16.h in the test emulator: IEEE binary16 through the compiler's _Float16, so every
// conversion rounds to nearest even exactly as the GPU's __float2half_rn does.
#pragma once

#include <cstring>

#include "emu.h"

struct alignas(2) __half
{
    unsigned short bits;
    __half() = default;
    __half(float f)
    {
        const _Float16 h = (_Float16) f;
        std::memcpy(&bits, &h, 2);
    }
    operator float() const
    {
        _Float16 h;
        std::memcpy(&h, &bits, 2);
        return (float) h;
    }
};
typedef __half half;

struct alignas(4) __half2
{
    __half x, y;
};
typedef __half2 half2;

inline float __half2float(half h) { return (float) h; }
inline half __float2half_rn(float f) { return half(f); }
inline half __int2half_rn(int i) { return half((float) i); }   // exact for |i| <= 2^24, all the kernels use
inline half __hmul(half a, half b) { return half((float) a * (float) b); }   // the fp32 product is exact
inline unsigned short __half_as_ushort(half h) { return h.bits; }
inline half __ushort_as_half(unsigned short u)
{
    half h;
    h.bits = u;
    return h;
}
inline half __low2half(half2 v) { return v.x; }
inline half __high2half(half2 v) { return v.y; }
inline float __low2float(half2 v) { return (float) v.x; }
inline float __high2float(half2 v) { return (float) v.y; }
inline half2 __halves2half2(half a, half b) { return half2{a, b}; }
inline half2 __floats2half2_rn(float a, float b) { return half2{half(a), half(b)}; }
inline float2 __half22float2(half2 v) { return float2{(float) v.x, (float) v.y}; }
