// Paged decode attention for few new tokens per sequence (q_len 1..8; any q_len is correct). Runs on sm_75+:
// fp16 storage, fp32 math, no tensor-core or async-copy instructions.
// Twin: exllamav2.attn.backend.AttentionBackend.attend_paged with MatmulBackend (attn/metadata.py rules):
// query i of sequence b sits at p = cache_seqlens[b] + i and sees key j iff j <= p and, with a window,
// p − j < window. Scores are (q·scale)·k, softcapped as cap·tanh(s/cap) when cap > 0, then softmax.
// Positions past the block table's capacity (pages_per_seq · page_size) are neither written nor read.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

constexpr int PAGED_ATTN_MAX_HEAD_DIM = 256;

struct PagedAttnArgs
{
    const half* q;                // [batch, q_len, q_heads, head_dim]
    const half* k_pages;          // [pages, page_size, kv_heads, head_dim]
    const half* v_pages;
    const int32_t* block_table;   // [batch, pages_per_seq]
    const int32_t* cache_seqlens; // [batch] tokens cached before this step
    half* out;                    // [batch, q_len, q_heads, head_dim]
    int batch, q_len, q_heads, kv_heads, head_dim, page_size, pages_per_seq;
    float scale, softcap;         // softcap 0: off
    int window;                   // 0: no sliding window
};

// Stores k_new/v_new [batch, q_len, kv_heads, head_dim] at positions cache_seqlens[b] + i.
cudaError_t paged_write_cuda(const half* k_new, const half* v_new, half* k_pages, half* v_pages,
                             const int32_t* block_table, const int32_t* cache_seqlens, int batch, int q_len,
                             int kv_heads, int head_dim, int page_size, int pages_per_seq, cudaStream_t stream);

// Number of key splits the attention will use on `device`, and the fp32 scratch it then needs.
int paged_attn_splits(const PagedAttnArgs& a, int device);
int64_t paged_attn_scratch_floats(const PagedAttnArgs& a, int splits);

cudaError_t paged_attn_cuda(const PagedAttnArgs& a, int splits, float* scratch, cudaStream_t stream);
