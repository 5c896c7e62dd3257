// KV-cache conversion between fp16 working tensors and quantized storage. Twin: exllamav2/kv_quant.py.
//
// Both sides hold `feat` elements per token (kv_heads * head_dim) on the same (batch, seq_len) token grid;
// a TokenWindow picks which tokens to convert. Q storage pads each token to `padded` elements (a multiple of
// 64): per token, padded*bits/8 bytes of codes and padded/32 fp16 scales.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

struct TokenWindow
{
    int batch;                   // sequences
    int seq_len;                 // tokens per sequence row of the grid (contiguous layout)
    int offset;                  // first position
    int width;                   // positions per sequence (an upper bound when end_at_seqlen)
    // Paged layout: position p of sequence b is token block_table[b][p / page_size] * page_size + p % page_size.
    const int32_t* seqlens;      // per-sequence cached lengths; null for the contiguous layout
    const int32_t* block_table;  // [batch, pages_per_seq]
    int pages_per_seq;
    int page_size;
    bool start_at_seqlen;        // positions start at seqlens[b] + offset (appending new tokens)
    bool end_at_seqlen;          // positions stop at seqlens[b] (reading what is cached)
};

cudaError_t fp16_to_fp8_cuda(const half* src, uint8_t* dst, int feat, const TokenWindow& w, cudaStream_t stream);
cudaError_t fp8_to_fp16_cuda(const uint8_t* src, half* dst, int feat, const TokenWindow& w, cudaStream_t stream);

// bits: 4 or 8
cudaError_t fp16_to_q_cuda(const half* src, uint8_t* q, half* scales, int feat, int padded, int bits,
                           const TokenWindow& w, cudaStream_t stream);
cudaError_t q_to_fp16_cuda(const uint8_t* q, const half* scales, half* dst, int feat, int padded, int bits,
                           const TokenWindow& w, cudaStream_t stream);
