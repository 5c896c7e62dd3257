// Rotary position embedding applied in place to x [B, L, H, D] fp16 (contiguous).
// Twin: exllamav2.rope.apply_rope with RopeTables. cos/sin are the tables [table_len, rot] (T = float or
// half) laid out as two equal halves (frequency i at columns i and i + rot/2); rot <= D is the rotary width.
// Token (b, l) uses table row positions[b * L + l], clamped to [0, table_len).
// neox: pairs (i, i + rot/2), else GPT-J pairs (2i, 2i + 1).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

template <typename T>
cudaError_t rope_cuda(half* x, const T* cos, const T* sin, const int64_t* positions, int tokens, int heads,
                      int head_dim, int rot, int table_len, bool neox, cudaStream_t stream);
