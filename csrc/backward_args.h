// The backward's inputs as one bundle, built once right after the input checks by the
// op entry points (entry_points.h) and passed to everything below them (the op schemas in
// bindings.cpp stay flat: the dispatcher needs them so). Torch headers: not for the .cu
// files.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "input_checks.h"
#include "margin_params.h"
#include "optim_update.h"

namespace fused_margin {

// A fused optimizer step: applied to the weight rows in use as their gradients are formed.
struct FusedUpdate {
  UpdateScalars scalars;
  std::vector<at::Tensor> state;  // UpdateScalars::num_state() tensors of weight's shape and dtype, written
  at::Tensor guard;               // int32 (2,) on weight's device: {status, written} (optim_update.h)
};

struct BackwardArgs {
  // upstream gradients (B,)
  at::Tensor grad_lse, grad_target_u, grad_sum;
  // the forward's inputs
  at::Tensor x, weight, labels;
  c10::optional<at::Tensor> bias, class_index, row_threshold;
  // the forward's saved outputs
  at::Tensor lse_neg, row_scale, col_scale;
  MarginParams params;
  int64_t classes;     // C, the classes in use
  int64_t chunk_size;  // classes per chunk requested (0: the backend chooses)
  // With a fused optimizer: weight (and the state) are updated in place and no weight
  // gradient is formed.
  c10::optional<FusedUpdate> update;
};

// The flat arguments of margin_lse_bwd, checked and bundled.
inline BackwardArgs backward_args(const InputChecks& checks, const at::Tensor& grad_lse,
                                  const at::Tensor& grad_target_u, const at::Tensor& grad_sum, const at::Tensor& x,
                                  const at::Tensor& weight, const at::Tensor& labels,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& class_index,
                                  const c10::optional<at::Tensor>& row_threshold, const at::Tensor& lse_neg,
                                  const at::Tensor& row_scale, const at::Tensor& col_scale, bool normalize_x,
                                  bool normalize_w, double scale, int64_t kind, double alpha, double delta,
                                  double margin, int64_t num_subcenters, int64_t chunk_size) {
  const MarginParams p = checks.params(normalize_x, normalize_w, scale, kind, alpha, delta, margin, num_subcenters);
  const int64_t classes = checks.inputs(x, weight, labels, bias, class_index, row_threshold, p);
  checks.backward_vectors(grad_lse, grad_target_u, grad_sum, lse_neg, row_scale, col_scale, x, classes,
                          num_subcenters);
  TORCH_CHECK(chunk_size >= 0, "fused_margin ", checks.backend, " backend: chunk_size must be >= 0, got ",
              chunk_size);
  return BackwardArgs{grad_lse, grad_target_u, grad_sum, x,        weight,    labels,  bias,   class_index,
                      row_threshold, lse_neg,  row_scale, col_scale, p, classes, chunk_size, c10::nullopt};
}

inline bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
}

// The fused update's arguments (the state tensors and the flat scalars of
// WeightUpdate.scalars()), checked against the weight.
inline FusedUpdate fused_update(const InputChecks& checks, const at::Tensor& weight, at::TensorList state,
                                c10::ArrayRef<double> scalars, const at::Tensor& guard) {
  const char* backend = checks.backend;
  TORCH_CHECK(static_cast<int64_t>(scalars.size()) == kUpdateScalarCount, "fused_margin ", backend,
              " backend: update must hold the ", kUpdateScalarCount, " scalars of WeightUpdate.scalars(), got ",
              scalars.size());
  for (size_t i = 0; i < scalars.size(); ++i) {
    TORCH_CHECK(std::isfinite(scalars[i]), "fused_margin ", backend, " backend: update[", i,
                "] must be finite, got ", scalars[i]);
  }
  const UpdateScalars s = UpdateScalars::from_list(scalars.data());
  TORCH_CHECK(scalars[0] == double(kUpdateSgd) || scalars[0] == double(kUpdateAdam), "fused_margin ", backend,
              " backend: update kind must be ", int64_t(kUpdateSgd), " (SGD) or ", int64_t(kUpdateAdam),
              " (Adam), got ", scalars[0]);
  if (s.kind == kUpdateAdam) {
    TORCH_CHECK(s.bias_correction1 != 0.0 && s.bias_correction2_sqrt != 0.0, "fused_margin ", backend,
                " backend: Adam's bias corrections must be nonzero, got bias_correction1=", s.bias_correction1,
                " and bias_correction2_sqrt=", s.bias_correction2_sqrt);
  }
  TORCH_CHECK(at::has_internal_overlap(weight) != at::MemOverlap::Yes, "fused_margin ", backend,
              " backend: a fused update writes weight in place, so its elements must not overlap (strides ",
              weight.strides(), ")");
  TORCH_CHECK(static_cast<int64_t>(state.size()) == s.num_state(), "fused_margin ", backend, " backend: state must hold ",
              s.num_state(), " tensor(s) for this update (", s.kind == kUpdateAdam ? "exp_avg, exp_avg_sq" :
              (s.num_state() == 1 ? "momentum_buffer" : "plain SGD keeps none"), "), got ", state.size());
  TORCH_CHECK(guard.scalar_type() == at::kInt && guard.dim() == 1 && guard.numel() == kGuardSize &&
                  guard.is_contiguous() && guard.device() == weight.device(),
              "fused_margin ", backend, " backend: guard must be a contiguous int32 tensor of shape (", kGuardSize,
              ",) on ", weight.device(), ", got ", guard.scalar_type(), " of shape ", guard.sizes(), " on ",
              guard.device());
  FusedUpdate update{s, {}, guard};
  for (size_t i = 0; i < state.size(); ++i) {
    const at::Tensor& t = state[i];
    TORCH_CHECK(t.device() == weight.device(), "fused_margin ", backend, " backend: state[", i, "] must be on ",
                weight.device(), ", got ", t.device());
    TORCH_CHECK(t.sizes() == weight.sizes(), "fused_margin ", backend, " backend: state[", i,
                "] must have weight's shape ", weight.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == weight.scalar_type(), "fused_margin ", backend, " backend: state[", i,
                "] must have weight's dtype ", weight.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "fused_margin ", backend, " backend: state[", i,
                "] is written in place, so its elements must not overlap (strides ", t.strides(), ")");
    TORCH_CHECK(!overlaps(t, weight) && (i == 0 || !overlaps(t, state[0])), "fused_margin ", backend,
                " backend: state[", i, "] must be memory of its own, not overlap weight or another state tensor");
    update.state.push_back(t);
  }
  return update;
}

}  // namespace fused_margin
