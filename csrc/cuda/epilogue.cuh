// Launchers of the CUDA kernels of the fused operation (epilogue.cu).
//
// Plain pointers, sizes and a cudaStream_t: no torch headers, so the .cu files compile
// quickly and without ATen's CUDA headers. The GEMMs (cuBLAS through ATen) and the
// chunk loop live in margin_lse_cuda.cpp; these kernels do everything that touches the
// (B x chunk) logits tile between and after the GEMMs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../margin_params.h"
#include "../optim_update.h"

namespace fused_margin {
namespace cuda {

// Storage types the kernels read or write. The accumulation type ("acc") is float or
// double; tiles, scales, bias, thresholds and the per-row gradients are in acc.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Online-logsumexp state of every row across chunks (device arrays of B entries).
struct RowStates {
  double* max;          // of the non-target z
  double* sumexp;       // sum exp(z - max)
  double* sum;          // sum of the non-target z
  double* best;         // max of the margin-free logit s*u + bias
  int64_t* best_index;  // its class (lowest on ties)
};

// One chunk of classes [first_class, first_class + num_classes) of the classes in use,
// against all B rows.
struct ChunkArgs {
  // tile
  const void* tile;           // (B, num_classes*K) acc: dot products <x_b, w_i>
  int64_t num_rows;           // B
  int64_t num_classes;        // classes in the chunk
  int64_t first_class;
  int64_t num_subcenters;     // K
  // per row (B)
  const void* row_scale;      // r_b (acc)
  const void* row_threshold;  // (2, B) CurricularFace thresholds then t (acc) or nullptr
  const int64_t* labels;      // target among the classes in use; others: none
  // per column
  const void* col_scale;      // (num_classes*K) q_i of the chunk (acc)
  const void* bias;           // (num_classes) of the chunk (acc) or nullptr
};

// Segments of the forward epilogue per row for a chunk of `num_classes` classes.
int64_t forward_segments(int64_t num_classes);
// Row blocks of the backward epilogue for B rows.
int64_t backward_row_blocks(int64_t num_rows);

// Resets `states` (B rows) before the first chunk.
void init_row_states(RowStates states, int64_t num_rows, cudaStream_t stream);

// Forward epilogue of one chunk: per-(segment, row) partials into `segment_buffer`
// (forward_segments(n) * B * 40 bytes), then merged into `states` in segment order.
// Writes target_u[b] (acc) for the rows whose target lies in the chunk.
void forward_chunk(const ChunkArgs& chunk, const MarginParams& p, DType acc, RowStates states, void* target_u,
                   void* segment_buffer, cudaStream_t stream);

// lse_neg, sum_neg (acc) and argmax (int64) from the final states.
void finalize_rows(RowStates states, int64_t num_rows, DType acc, void* lse_neg, void* sum_neg, int64_t* argmax,
                   cudaStream_t stream);

struct RowGradArgs {
  const void* grad_lse;       // (B) acc
  const void* grad_target_u;  // (B) acc
  const void* grad_sum;       // (B) acc
  const void* lse_neg;        // (B) acc, from the forward
};

// Backward epilogue of one chunk: writes G = dU * r_b * q_i (B, num_classes*K) in
// `grad_type` (it may alias the tile when grad_type is acc), zero where a sub-center
// is not the max. With `grad_bias` (num_classes, acc), also its sum over rows of dz,
// through `bias_partials` (backward_row_blocks(B) * num_classes acc), in a fixed order.
void backward_chunk(const ChunkArgs& chunk, const RowGradArgs& grads, const MarginParams& p, DType acc,
                    void* grad_tile, DType grad_type, void* grad_bias, void* bias_partials, cudaStream_t stream);

// T(u) and T'(u) of the kind p.kind (csrc/non_target.h) elementwise over a (rows, cols)
// row-major acc array: the hook through which tests compare the device code with the
// transform's Python definition. row_threshold: (2, rows) acc, or nullptr.
void non_target_values(const void* u, const void* row_threshold, int64_t rows, int64_t cols, const MarginParams& p,
                       DType acc, void* value, void* derivative, cudaStream_t stream);

// inv_norm[i] = 1 / max(||row_i||, kNormEps) for n contiguous rows of `dim` elements.
void inverse_row_norms(const void* rows, DType row_type, int64_t n, int64_t dim, void* inv_norm, DType acc,
                       cudaStream_t stream);

// The tangent projection of folded normalization, and the store:
// out[dst_i] = g_i - <g_i, v_i> s_i^2 v_i (just g_i when inv_norm is nullptr), with
// g (n, dim) acc, v (n, dim) in v_type, dst_i = dst_rows[i] or first_out_row + i.
void project_rows(const void* g, const void* v, DType v_type, const void* inv_norm, int64_t n, int64_t dim,
                  void* out, DType out_type, const int64_t* dst_rows, int64_t first_out_row, DType acc,
                  cudaStream_t stream);

// A fused optimizer step (../optim_update.h) on the n weight rows of one chunk, with the
// tangent projection of their gradient folded in: g_i = grad_i - <grad_i, v_i> q_i^2 v_i
// (just grad_i when inv_norm is nullptr), then the rule on weight row dst_i and its
// state rows, each element read once in `storage` and written back rounded once.
struct UpdateRowsArgs {
  const void* grad;          // (n, dim) acc, contiguous: the chunk's raw weight gradient
  const void* rows;          // (n, dim) in rows_type, contiguous: the chunk's rows as the GEMMs read them
  DType rows_type;
  const void* inv_norm;      // (n) acc: q_i of the chunk, or nullptr (no projection)
  int64_t n;
  int64_t dim;
  const int64_t* dst_rows;   // (n) device indices of the rows in weight, or nullptr: first_row + i
  int64_t first_row;
  DType storage;             // the dtype of weight and of its state
  void* weight;              // written in place, element (r, d) at r * stride[0] + d * stride[1]
  int64_t weight_stride[2];
  void* state[2];            // momentum_buffer, or exp_avg and exp_avg_sq; nullptr where absent
  int64_t state_stride[2][2];
  int32_t* guard;            // (kGuardSize) device: {status, written} (../optim_update.h)
};
// The guard's check of a chunk, launched before update_rows: when a projected gradient
// element is not finite, sets kGuardNonFiniteGradient in guard[kGuardStatus]. update_rows
// then writes nothing (nor for any later chunk), and otherwise sets guard[kGuardWritten].
void check_rows(const UpdateRowsArgs& args, DType acc, cudaStream_t stream);
void update_rows(const UpdateRowsArgs& args, const UpdateScalars& update, DType acc, cudaStream_t stream);

}  // namespace cuda
}  // namespace fused_margin
