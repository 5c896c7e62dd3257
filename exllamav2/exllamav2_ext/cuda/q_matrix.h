// EXL2 and GPTQ weights: reconstruction to fp16 and the fused few-row GEMM. Twins: exllamav2.quant
// (Exl2Weight / GptqWeight .dequantize() and .forward()).
//
// Both formats are read the same way: per column, the q_weight words of a run of rows form an LSB-first
// bitstream and local row i's code is the `bits` bits at stream bit i·bits. The weight is cut into chunks
// of at most 32 stored rows that never cross a group and start on a word boundary (prepared on the host by
// exllamav2/qmatrix.py), so a thread can decode one chunk of one column from `bits` words.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

constexpr int QFORMAT_EXL2 = 0;
constexpr int QFORMAT_GPTQ = 1;
constexpr int Q_CHUNK_FIELDS = 5;   // first stored row, rows (1..32), bits, first q_weight row, group
constexpr int Q_MAX_GEMM_CHUNKS = 65535 * 8;

struct QMatrixView
{
    int format;
    const uint32_t* q_weight;   // [words, q_stride]
    int q_stride;               // columns of q_weight (N padded to 32 for EXL2, N for GPTQ)
    const int32_t* chunks;      // [num_chunks, Q_CHUNK_FIELDS], in stored row order
    int num_chunks;
    const int32_t* perm;        // [K]: stored row k holds input feature perm[k]; null for the identity
    int K;
    int N;
    // EXL2: scale = fp16( fp16((s+1)^2) · scale_max[g] ), s the 4-bit code of column n in q_scale row g
    // (row stride q_stride/8); zero point 2^(bits-1).
    const uint32_t* q_scale;
    const half* scale_max;
    // GPTQ: scale = scales[g, n] (row stride N); zero point = nibble n of qzeros row g (stride N/8) + zero_offset.
    const half* scales;
    const uint32_t* qzeros;
    int zero_offset;
};

// out [K, cols] (row-major) = columns [col_start, col_start + cols) of W in input-feature order:
// w = fp16( fp16(code − zero) · scale ), bit-exact with the twin.
cudaError_t q_reconstruct_cuda(const QMatrixView& q, half* out, int col_start, int cols, cudaStream_t stream);

// y [M, N] = x [M, K] (row stride x_stride) · W (+ bias [N] when not null); acc is fp32 scratch [M, N].
// Products are summed in fp32 per chunk and scaled per group, so results differ from the twin by rounding.
cudaError_t q_gemm_cuda(const QMatrixView& q, const half* x, int M, int x_stride, const half* bias, float* acc,
                        half* y, cudaStream_t stream);
