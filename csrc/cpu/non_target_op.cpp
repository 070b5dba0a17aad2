// fused_margin_C::non_target_transform: T(u) and T'(u) of csrc/non_target.h evaluated
// elementwise on a tensor, with the kernels' own code (the CPU epilogue's vector lanes
// here; the CUDA one in csrc/cuda/non_target_op.cpp runs the device code). It is not part
// of the loss: tests/test_non_target.py compares it with the Python definition
// (fused_margin.spec.NonTarget.value / derivative) on a grid of cosines.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "../input_checks.h"
#include "../margin_params.h"
#include "epilogue.h"

TORCH_LIBRARY_FRAGMENT(fused_margin_C, m) {
  // u: (rows, cols) fp32 / fp64; row_threshold: (2, rows) CurricularFace's thresholds then t
  // per row (required for that kind), in u's dtype. Returns (T(u), T'(u)) shaped as u.
  m.def(
      "non_target_transform(Tensor u, Tensor? row_threshold, int kind, float alpha, float delta, float margin) "
      "-> (Tensor value, Tensor derivative)");
}

namespace fused_margin {
namespace cpu {
namespace {

constexpr InputChecks kChecks{"cpu", c10::DeviceType::CPU};

std::tuple<at::Tensor, at::Tensor> non_target_transform_cpu(const at::Tensor& u_in,
                                                            const c10::optional<at::Tensor>& row_threshold,
                                                            int64_t kind, double alpha, double delta,
                                                            double margin) {
  const MarginParams p = kChecks.transform_inputs(u_in, row_threshold, kind, alpha, delta, margin);
  const at::Tensor u = u_in.contiguous();
  const int64_t rows = u.size(0), cols = u.size(1);
  const at::Tensor thresholds = row_threshold.has_value() ? row_threshold->contiguous() : at::Tensor();
  at::Tensor value = at::empty_like(u);
  at::Tensor derivative = at::empty_like(u);
  if (u.scalar_type() == at::kFloat) {
    non_target_values(u.data_ptr<float>(), thresholds.defined() ? thresholds.data_ptr<float>() : nullptr, rows,
                      cols, p, value.data_ptr<float>(), derivative.data_ptr<float>());
  } else {
    non_target_values(u.data_ptr<double>(), thresholds.defined() ? thresholds.data_ptr<double>() : nullptr, rows,
                      cols, p, value.data_ptr<double>(), derivative.data_ptr<double>());
  }
  return {value, derivative};
}

}  // namespace
}  // namespace cpu
}  // namespace fused_margin

TORCH_LIBRARY_IMPL(fused_margin_C, CPU, m) {
  m.impl("non_target_transform", &fused_margin::cpu::non_target_transform_cpu);
}
