#pragma once

#include <ATen/ATen.h>
#include <optional>

// Conversions between an fp16 working tensor [batch, seq_len, ...] and cache storage on the same token grid,
// for the tokens of a window (see cuda/cache.h). Contiguous: positions [offset, offset + width) of sequences
// 0..batch-1. Paged (seqlens and block_table given, page_size > 0): start_at_seqlen picks positions
// [seqlens[b] + offset, + width) (storing new tokens), end_at_seqlen stops at seqlens[b] (loading the cache).
#define EXT_WINDOW_ARGS                                                                                     \
    int64_t batch, int64_t offset, int64_t width, const std::optional<at::Tensor>& seqlens,                  \
        const std::optional<at::Tensor>& block_table, int64_t page_size, bool start_at_seqlen, bool end_at_seqlen

// FP8 storage: uint8, same shape as the fp16 tensor.
void fp16_to_fp8(const at::Tensor& src, at::Tensor& dst, EXT_WINDOW_ARGS);
void fp8_to_fp16(const at::Tensor& src, at::Tensor& dst, EXT_WINDOW_ARGS);

// Q storage (bits 4 or 8): q uint8 [batch, seq_len, padded * bits / 8], scales fp16 [batch, seq_len, padded / 32],
// padded = per-token element count rounded up to a multiple of 64.
void fp16_to_q(const at::Tensor& src, at::Tensor& q, at::Tensor& scales, int64_t bits, EXT_WINDOW_ARGS);
void q_to_fp16(const at::Tensor& q, const at::Tensor& scales, at::Tensor& dst, int64_t bits, EXT_WINDOW_ARGS);
