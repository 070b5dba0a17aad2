// Checks of the extension ops' inputs at the boundary, shared by the CPU and the CUDA
// host code (torch headers: not for the .cu files). Every message starts with
// "fused_margin <backend> backend: " and names the argument at fault.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>

#include "margin_params.h"

namespace fused_margin {

struct InputChecks {
  const char* backend;          // "cpu" | "cuda", for the messages
  c10::DeviceType device_type;  // where x must live; every other tensor on x's device

  // t is on x's device.
  void on_device(const at::Tensor& t, const char* name, const at::Tensor& x) const {
    TORCH_CHECK(t.device() == x.device(), "fused_margin ", backend, " backend: ", name, " must be on ", x.device(),
                ", got ", t.device());
  }

  // t has shape (size,) and is on x's device.
  void vector(const at::Tensor& t, const char* name, int64_t size, const at::Tensor& x) const {
    on_device(t, name, x);
    TORCH_CHECK(t.dim() == 1 && t.size(0) == size, "fused_margin ", backend, " backend: ", name,
                " must have shape (", size, ",), got ", t.sizes());
  }

  // CurricularFace's thresholds then t per row of x: required for that kind; when given,
  // of shape (2, B) and on x's device.
  void row_thresholds(const c10::optional<at::Tensor>& row_threshold, int64_t kind, const at::Tensor& x) const {
    TORCH_CHECK(kind != kCurricular || row_threshold.has_value(), "fused_margin ", backend,
                " backend: the CurricularFace kind needs row_threshold");
    if (row_threshold.has_value()) {
      on_device(*row_threshold, "row_threshold", x);
      TORCH_CHECK(row_threshold->dim() == 2 && row_threshold->size(0) == 2 && row_threshold->size(1) == x.size(0),
                  "fused_margin ", backend, " backend: row_threshold must have shape (2, ", x.size(0), "), got ",
                  row_threshold->sizes());
    }
  }

  MarginParams params(bool normalize_x, bool normalize_w, double scale, int64_t kind, double alpha, double delta,
                      double margin, int64_t num_subcenters) const {
    TORCH_CHECK(kind >= kIdentity && kind <= kFiltered, "fused_margin ", backend,
                " backend: kind must be a NonTargetKind (0..5), got ", kind);
    TORCH_CHECK(num_subcenters >= 1, "fused_margin ", backend, " backend: num_subcenters must be >= 1, got ",
                num_subcenters);
    return MarginParams{normalize_x, normalize_w, scale, kind, alpha, delta, margin, num_subcenters};
  }

  // The inputs of non_target_transform (the transform alone, for tests): u (rows, cols)
  // fp32 / fp64, row_threshold (2, rows) in u's dtype (required for CurricularFace).
  // Returns the transform's parameters.
  MarginParams transform_inputs(const at::Tensor& u, const c10::optional<at::Tensor>& row_threshold, int64_t kind,
                                double alpha, double delta, double margin) const {
    const MarginParams p = params(false, false, 1.0, kind, alpha, delta, margin, 1);
    TORCH_CHECK(u.dim() == 2, "fused_margin ", backend, " backend: u must have shape (rows, cols), got ", u.sizes());
    TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble, "fused_margin ", backend,
                " backend: u must be float32 or float64, got ", u.scalar_type());
    row_thresholds(row_threshold, kind, u);
    if (row_threshold.has_value()) {
      TORCH_CHECK(row_threshold->scalar_type() == u.scalar_type(), "fused_margin ", backend,
                  " backend: row_threshold must be ", u.scalar_type(), " as u, got ", row_threshold->scalar_type());
    }
    return p;
  }

  // The inputs the forward and backward share; returns C, the number of classes in use.
  int64_t inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& class_index,
                 const c10::optional<at::Tensor>& row_threshold, const MarginParams& p) const {
    TORCH_CHECK(x.device().type() == device_type, "fused_margin ", backend, " backend: x must be a ",
                c10::DeviceTypeName(device_type), " tensor, got ", x.device());
    on_device(weight, "weight", x);
    TORCH_CHECK(x.dim() == 2, "fused_margin ", backend, " backend: x must have shape (B, D), got ", x.sizes());
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "fused_margin ", backend,
                " backend: weight must have shape (R, ", x.size(1), ") to match x, got ", weight.sizes());
    TORCH_CHECK(x.is_floating_point() && weight.is_floating_point(), "fused_margin ", backend,
                " backend: x and weight must be floating point, got ", x.scalar_type(), " and ",
                weight.scalar_type());
    const int64_t k = p.num_subcenters;
    TORCH_CHECK(weight.size(0) % k == 0, "fused_margin ", backend, " backend: weight has ", weight.size(0),
                " rows, not a multiple of num_subcenters=", k);
    const int64_t classes_all = weight.size(0) / k;
    vector(labels, "labels", x.size(0), x);
    TORCH_CHECK(labels.scalar_type() == at::kLong, "fused_margin ", backend, " backend: labels must be int64, got ",
                labels.scalar_type());
    if (bias.has_value()) {
      vector(*bias, "bias", classes_all, x);
      TORCH_CHECK(bias->is_floating_point(), "fused_margin ", backend, " backend: bias must be floating point");
    }
    int64_t classes = classes_all;
    if (class_index.has_value()) {
      on_device(*class_index, "class_index", x);
      TORCH_CHECK(class_index->dim() == 1 && class_index->scalar_type() == at::kLong, "fused_margin ", backend,
                  " backend: class_index must be a 1-D int64 tensor, got ", class_index->sizes(), " ",
                  class_index->scalar_type());
      classes = class_index->size(0);
    }
    TORCH_CHECK(classes >= 1, "fused_margin ", backend, " backend: there must be at least one class");
    row_thresholds(row_threshold, p.kind, x);
    return classes;
  }

  // The backward's per-row and per-column vectors.
  void backward_vectors(const at::Tensor& grad_lse, const at::Tensor& grad_target_u, const at::Tensor& grad_sum,
                        const at::Tensor& lse_neg, const at::Tensor& row_scale, const at::Tensor& col_scale,
                        const at::Tensor& x, int64_t classes, int64_t k) const {
    const int64_t batch = x.size(0);
    vector(grad_lse, "grad_lse", batch, x);
    vector(grad_target_u, "grad_target_u", batch, x);
    vector(grad_sum, "grad_sum", batch, x);
    vector(lse_neg, "lse_neg", batch, x);
    vector(row_scale, "row_scale", batch, x);
    vector(col_scale, "col_scale", classes * k, x);
  }
};

// The checks of each backend's ops.
inline constexpr InputChecks kCpuChecks{"cpu", c10::DeviceType::CPU};
inline constexpr InputChecks kCudaChecks{"cuda", c10::DeviceType::CUDA};

}  // namespace fused_margin
