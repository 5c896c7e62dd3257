#pragma once

#include <ATen/ATen.h>

// attend_paged for few new tokens: stores k_new/v_new [B, L, Hkv, D] at positions cache_seqlens[b] + i of
// k_pages/v_pages [pages, page_size, Hkv, D] through block_table [B, pages_per_seq], then attends q [B, L, Hq, D]
// over each whole sequence (causal, optional sliding window and softcap). fp16 CUDA tensors; returns [B, L, Hq, D].
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_pages,
                           at::Tensor& v_pages, const at::Tensor& block_table, const at::Tensor& cache_seqlens,
                           double scale, int64_t window, double softcap);
