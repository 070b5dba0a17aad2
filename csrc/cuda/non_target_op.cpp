// CUDA implementation of fused_margin_C::non_target_transform (declared in
// csrc/cpu/non_target_op.cpp): T(u) and T'(u) of csrc/non_target.h evaluated by the device
// code the CUDA epilogue kernels run, for tests/test_non_target.py.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../margin_params.h"
#include "epilogue.cuh"

namespace fused_margin {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> non_target_transform_cuda(const at::Tensor& u_in,
                                                             const c10::optional<at::Tensor>& row_threshold,
                                                             int64_t kind, double alpha, double delta,
                                                             double margin) {
  TORCH_CHECK(kind >= kIdentity && kind <= kFiltered,
              "fused_margin cuda backend: kind must be a NonTargetKind (0..5), got ", kind);
  TORCH_CHECK(u_in.dim() == 2, "fused_margin cuda backend: u must have shape (rows, cols), got ", u_in.sizes());
  TORCH_CHECK(u_in.scalar_type() == at::kFloat || u_in.scalar_type() == at::kDouble,
              "fused_margin cuda backend: u must be float32 or float64, got ", u_in.scalar_type());
  TORCH_CHECK(kind != kCurricular || row_threshold.has_value(),
              "fused_margin cuda backend: the CurricularFace kind needs row_threshold");
  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous();
  const int64_t rows = u.size(0), cols = u.size(1);
  at::Tensor thresholds;
  if (row_threshold.has_value()) {
    TORCH_CHECK(row_threshold->device() == u.device(), "fused_margin cuda backend: row_threshold must be on ",
                u.device(), ", got ", row_threshold->device());
    TORCH_CHECK(row_threshold->dim() == 2 && row_threshold->size(0) == 2 && row_threshold->size(1) == rows,
                "fused_margin cuda backend: row_threshold must have shape (2, ", rows, "), got ",
                row_threshold->sizes());
    TORCH_CHECK(row_threshold->scalar_type() == u.scalar_type(),
                "fused_margin cuda backend: row_threshold must be ", u.scalar_type(), " as u, got ",
                row_threshold->scalar_type());
    thresholds = row_threshold->contiguous();
  }
  const MarginParams p{false, false, 1.0, kind, alpha, delta, margin, 1};
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
