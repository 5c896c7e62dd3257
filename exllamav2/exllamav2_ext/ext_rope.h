#pragma once

#include <ATen/ATen.h>

// Rotates x [B, L, H, D] (fp16 CUDA, contiguous) in place. cos/sin: RopeTables' [T, R] tables (fp32 or fp16),
// R <= D the rotary width; positions [B, L] integer table rows (any device); neox: rotate halves, else GPT-J pairs.
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions, bool neox);
