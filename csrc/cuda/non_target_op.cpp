// CUDA implementation of fused_margin_C::non_target_transform (declared in
// csrc/cpu/non_target_op.cpp): T(u) and T'(u) of csrc/non_target.h evaluated by the device
// code the CUDA epilogue kernels run, for tests/test_non_target.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../input_checks.h"
#include "../margin_params.h"
#include "epilogue.cuh"

namespace fused_margin {
namespace cuda {
namespace {

constexpr InputChecks kChecks{"cuda", c10::DeviceType::CUDA};

std::tuple<at::Tensor, at::Tensor> non_target_transform_cuda(const at::Tensor& u_in,
                                                             const c10::optional<at::Tensor>& row_threshold,
                                                             int64_t kind, double alpha, double delta,
                                                             double margin) {
  const MarginParams p = kChecks.transform_inputs(u_in, row_threshold, kind, alpha, delta, margin);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous();
  const int64_t rows = u.size(0), cols = u.size(1);
  const at::Tensor thresholds = row_threshold.has_value() ? row_threshold->contiguous() : at::Tensor();
  at::Tensor value = at::empty_like(u);
  at::Tensor derivative = at::empty_like(u);
  const DType acc = u.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  non_target_values(u.data_ptr(), thresholds.defined() ? thresholds.data_ptr() : nullptr, rows, cols, p, acc,
                    value.data_ptr(), derivative.data_ptr(), c10::cuda::getCurrentCUDAStream());
  return {value, derivative};
}

}  // namespace
}  // namespace cuda
}  // namespace fused_margin

TORCH_LIBRARY_IMPL(fused_margin_C, CUDA, m) {
  m.impl("non_target_transform", &fused_margin::cuda::non_target_transform_cuda);
}
