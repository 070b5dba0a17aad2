// The op entry points of margin_lse_fwd, margin_lse_bwd and margin_lse_bwd_update for one
// backend, and their registration: the only place (with backward_args in
// backward_args.h and the schemas in bindings.cpp) that spells the ops' flat arguments.
// A backend supplies its input checks (input_checks.h), its forward over ForwardArgs and
// its backward over BackwardArgs. Torch headers: not for the .cu files.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "backward_args.h"
#include "input_checks.h"
#include "margin_params.h"

namespace fused_margin {

// The forward's inputs, checked.
struct ForwardArgs {
  at::Tensor x, weight, labels;
  c10::optional<at::Tensor> bias, class_index, row_threshold;
  MarginParams params;
  int64_t classes;     // C, the classes in use
  int64_t chunk_size;  // classes per chunk requested (0: the backend chooses)
};

// (lse_neg, target_u, sum_neg, argmax, row_scale, col_scale)
using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
// (grad_x, grad_weight, grad_bias)
using BackwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

template <const InputChecks& Checks, ForwardOutputs (*Forward)(const ForwardArgs&),
          BackwardOutputs (*Backward)(const BackwardArgs&)>
struct EntryPoints {
  static ForwardOutputs forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& class_index,
                                const c10::optional<at::Tensor>& row_threshold, bool normalize_x, bool normalize_w,
                                double scale, int64_t kind, double alpha, double delta, double margin,
                                int64_t num_subcenters, int64_t chunk_size) {
    const MarginParams p = Checks.params(normalize_x, normalize_w, scale, kind, alpha, delta, margin, num_subcenters);
    const int64_t classes = Checks.inputs(x, weight, labels, bias, class_index, row_threshold, p);
    return Forward(ForwardArgs{x, weight, labels, bias, class_index, row_threshold, p, classes, chunk_size});
  }

  static BackwardOutputs backward(
      const at::Tensor& grad_lse, const at::Tensor& grad_target_u, const at::Tensor& grad_sum, const at::Tensor& x,
      const at::Tensor& weight, const at::Tensor& labels, const c10::optional<at::Tensor>& bias,
      const c10::optional<at::Tensor>& class_index, const c10::optional<at::Tensor>& row_threshold,
      const at::Tensor& lse_neg, const at::Tensor& row_scale, const at::Tensor& col_scale, bool normalize_x,
      bool normalize_w, double scale, int64_t kind, double alpha, double delta, double margin,
      int64_t num_subcenters, int64_t chunk_size) {
    return Backward(backward_args(Checks, grad_lse, grad_target_u, grad_sum, x, weight, labels, bias, class_index,
                                  row_threshold, lse_neg, row_scale, col_scale, normalize_x, normalize_w, scale, kind,
                                  alpha, delta, margin, num_subcenters, chunk_size));
  }

  // weight and the state are written; returns (grad_x, grad_bias)
  static std::tuple<at::Tensor, at::Tensor> backward_update(
      const at::Tensor& grad_lse, const at::Tensor& grad_target_u, const at::Tensor& grad_sum, const at::Tensor& x,
      const at::Tensor& weight, const at::Tensor& labels, const c10::optional<at::Tensor>& bias,
      const c10::optional<at::Tensor>& class_index, const c10::optional<at::Tensor>& row_threshold,
      const at::Tensor& lse_neg, const at::Tensor& row_scale, const at::Tensor& col_scale, bool normalize_x,
      bool normalize_w, double scale, int64_t kind, double alpha, double delta, double margin,
      int64_t num_subcenters, at::TensorList state, c10::ArrayRef<double> update, const at::Tensor& guard,
      int64_t chunk_size) {
    BackwardArgs a = backward_args(Checks, grad_lse, grad_target_u, grad_sum, x, weight, labels, bias, class_index,
                                   row_threshold, lse_neg, row_scale, col_scale, normalize_x, normalize_w, scale,
                                   kind, alpha, delta, margin, num_subcenters, chunk_size);
    a.update = fused_update(Checks, weight, state, update, guard);
    auto [grad_x, grad_weight, grad_bias] = Backward(a);
    return {grad_x, grad_bias};
  }

  // The backend's implementations, in its TORCH_LIBRARY_IMPL block.
  static void register_ops(torch::Library& m) {
    m.impl("margin_lse_fwd", &forward);
    m.impl("margin_lse_bwd", &backward);
    m.impl("margin_lse_bwd_update", &backward_update);
  }
};

}  // namespace fused_margin
