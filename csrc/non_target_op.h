// The op entry point of fused_margin_C::non_target_transform (declared in
// csrc/cpu/non_target_op.cpp) for one backend: T(u) and T'(u) of csrc/non_target.h
// evaluated elementwise on a tensor by that backend's kernel code, for
// tests/test_non_target.py. Torch headers: not for the .cu files.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <tuple>

#include "input_checks.h"
#include "margin_params.h"

namespace fused_margin {

// Checks the inputs, then `Evaluate(u, thresholds, p, value, derivative)` writes T(u) and
// T'(u) of the (rows, cols) contiguous u into value and derivative (shaped as u);
// thresholds: (2, rows) contiguous, or undefined without row_threshold.
template <const InputChecks& Checks,
          void (*Evaluate)(const at::Tensor& u, const at::Tensor& thresholds, const MarginParams& p,
                           const at::Tensor& value, const at::Tensor& derivative)>
std::tuple<at::Tensor, at::Tensor> non_target_transform(const at::Tensor& u_in,
                                                        const c10::optional<at::Tensor>& row_threshold, int64_t kind,
                                                        double alpha, double delta, double margin) {
  const MarginParams p = Checks.transform_inputs(u_in, row_threshold, kind, alpha, delta, margin);
  const at::Tensor u = u_in.contiguous();
  const at::Tensor thresholds = row_threshold.has_value() ? row_threshold->contiguous() : at::Tensor();
  at::Tensor value = at::empty_like(u);
  at::Tensor derivative = at::empty_like(u);
  Evaluate(u, thresholds, p, value, derivative);
  return {value, derivative};
}

}  // namespace fused_margin
