// The CPU kernels' fused epilogues: everything that touches the (B x chunk) logits tile
// between and after the GEMMs, plus the O(rows x D) norm and projection helpers.
//
// Plain pointers, no torch headers: this translation unit is compiled once per x86
// instruction-set level (GCC target_clones) and picked at load time, so the exp and the
// selects vectorize to AVX-512 / AVX2 without building the whole extension for one CPU.
#pragma once

#include <cstdint>
#include <limits>

#include "../margin_params.h"

namespace fused_margin {
namespace cpu {

// The online-logsumexp state of one row over the classes one group of chunks has seen
// (double: merging thousands of chunk partials costs nothing and loses nothing).
struct RowState {
  double max = -std::numeric_limits<double>::infinity();  // of the non-target z
  double sumexp = 0.0;                                     // sum exp(z - max)
  double sum = 0.0;                                        // sum of the non-target z
  double best = -std::numeric_limits<double>::infinity();  // max of s*u + bias (all classes)
  int64_t best_index = -1;                                 // its class, lowest on ties
};

// One chunk of classes [first_class, first_class + num_classes) against all B rows.
template <typename T>
struct ChunkTile {
  // tile
  T* tile;                  // (B, num_classes * K) dot products <x_b, w_i>, row-major
  int64_t num_rows;         // B
  int64_t num_classes;      // classes in this chunk
  int64_t first_class;      // index of the chunk's first class among the classes in use
  // per row
  const T* row_scale;       // (B,) r_b (ones when x is not normalized)
  const T* row_threshold;   // (2, B) CurricularFace thresholds then t per row, or nullptr
  const int64_t* labels;    // (B,) target class among the classes in use; others: none
  // per column
  const T* col_scale;       // (num_classes * K,) q_i of the chunk's rows
  const T* bias;            // (num_classes,) bias of the chunk's classes (zeros without bias)
  // workspace
  T* scratch;               // 3 * num_classes
  int32_t* best_sub;        // num_classes (sub-center argmax, K > 1)
};

template <typename T>
struct RowGrads {
  const T* grad_lse;       // (B,)
  const T* grad_target_u;  // (B,)
  const T* grad_sum;       // (B,)
  const T* lse_neg;        // (B,) from the forward
  T* grad_bias;            // (num_classes,) of the chunk, accumulated over rows; or nullptr
};

// Forward epilogue: merges the chunk's classes into `state` (B entries) and writes
// target_u[b] for the rows whose target lies in the chunk. Overwrites the tile.
void forward_epilogue(const ChunkTile<float>& c, const MarginParams& p, RowState* state, float* target_u);
void forward_epilogue(const ChunkTile<double>& c, const MarginParams& p, RowState* state, double* target_u);

// Backward epilogue: replaces the tile by G = dU * r_b * q_i (the matrix the dX and dW
// GEMMs consume), zero where a sub-center is not the max, with denormals flushed.
void backward_epilogue(const ChunkTile<float>& c, const MarginParams& p, const RowGrads<float>& g);
void backward_epilogue(const ChunkTile<double>& c, const MarginParams& p, const RowGrads<double>& g);

// T(u) and T'(u) of the kind p.kind (csrc/non_target.h) over a (rows, cols) row-major
// array, in the epilogues' vector lanes (a scalar tail per row): the hook through which
// tests compare the kernels' transform with its Python definition. row_threshold: (2, rows)
// CurricularFace's constants per row, or nullptr.
void non_target_values(const float* u, const float* row_threshold, int64_t rows, int64_t cols,
                       const MarginParams& p, float* value, float* derivative);
void non_target_values(const double* u, const double* row_threshold, int64_t rows, int64_t cols,
                       const MarginParams& p, double* value, double* derivative);

// out[i] = 1 / max(||rows_i||, kNormEps) for `n` rows of `dim` contiguous elements.
void inv_row_norms(const float* rows, int64_t n, int64_t dim, float* out);
void inv_row_norms(const double* rows, int64_t n, int64_t dim, double* out);

// The tangent projection of folded normalization: g_i -= <g_i, v_i> * s_i^2 * v_i for
// `n` rows (g: the raw GEMM gradient of row i, v: the input row, s: its inverse norm).
void remove_radial(float* grads, const float* rows, const float* inv_norm, int64_t n, int64_t dim);
void remove_radial(double* grads, const double* rows, const double* inv_norm, int64_t n, int64_t dim);

}  // namespace cpu
}  // namespace fused_margin
