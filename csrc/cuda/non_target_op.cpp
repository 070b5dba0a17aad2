// CUDA implementation of fused_margin_C::non_target_transform (declared in
// csrc/cpu/non_target_op.cpp): T(u) and T'(u) of csrc/non_target.h evaluated by the device
// code the CUDA epilogue kernels run, for tests/test_non_target.py.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../input_checks.h"
#include "../margin_params.h"
#include "../non_target_op.h"
#include "epilogue.cuh"

namespace fused_margin {
namespace cuda {
namespace {

void evaluate(const at::Tensor& u, const at::Tensor& thresholds, const MarginParams& p, const at::Tensor& value,
              const at::Tensor& derivative) {
  const c10::cuda::CUDAGuard guard(u.device());
  const DType acc = u.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  non_target_values(u.data_ptr(), thresholds.defined() ? thresholds.data_ptr() : nullptr, u.size(0), u.size(1), p,
                    acc, value.data_ptr(), derivative.data_ptr(), c10::cuda::getCurrentCUDAStream());
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_margin_C, CUDA, m) {
  m.impl("non_target_transform", &non_target_transform<kCudaChecks, &evaluate>);
}

}  // namespace cuda
}  // namespace fused_margin
