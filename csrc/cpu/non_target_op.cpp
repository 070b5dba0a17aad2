// fused_margin_C::non_target_transform: T(u) and T'(u) of csrc/non_target.h evaluated
// elementwise on a tensor, with the kernels' own code (the CPU epilogue's vector lanes
// here; the CUDA one in csrc/cuda/non_target_op.cpp runs the device code). It is not part
// of the loss: tests/test_non_target.py compares it with the Python definition
// (fused_margin.spec.NonTarget.value / derivative) on a grid of cosines.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../input_checks.h"
#include "../margin_params.h"
#include "../non_target_op.h"
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

void evaluate(const at::Tensor& u, const at::Tensor& thresholds, const MarginParams& p, const at::Tensor& value,
              const at::Tensor& derivative) {
  const int64_t rows = u.size(0), cols = u.size(1);
  if (u.scalar_type() == at::kFloat) {
    non_target_values(u.data_ptr<float>(), thresholds.defined() ? thresholds.data_ptr<float>() : nullptr, rows,
                      cols, p, value.data_ptr<float>(), derivative.data_ptr<float>());
  } else {
    non_target_values(u.data_ptr<double>(), thresholds.defined() ? thresholds.data_ptr<double>() : nullptr, rows,
                      cols, p, value.data_ptr<double>(), derivative.data_ptr<double>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_margin_C, CPU, m) {
  m.impl("non_target_transform", &non_target_transform<kCpuChecks, &evaluate>);
}

}  // namespace cpu
}  // namespace fused_margin
