// The weight rows of a chunk of classes, shared by the CPU and the CUDA host code (torch
// headers: not for the .cu files).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace fused_margin {

// Hands out the weight rows of a chunk (n classes * K sub-centers) as a contiguous
// (n*K, D) tensor of `dtype`: a view of `weight` when possible, else a gathered and/or
// converted copy of just this chunk, in buffers of `max_rows` rows allocated once
// (bounded workspace, reused from chunk to chunk).
class ChunkRows {
 public:
  ChunkRows(const at::Tensor& weight, const c10::optional<at::Tensor>& class_index, int64_t k, at::ScalarType dtype,
            int64_t max_rows)
      : weight_(weight), index_(class_index), k_(k), dtype_(dtype) {
    // A strided weight (e.g. the transposed view of a (D, C) parameter) is copied chunk by
    // chunk into the bounded buffer, never as a whole.
    direct_ = !index_.has_value() && weight.scalar_type() == dtype && weight.is_contiguous();
    if (!direct_) buffer_ = at::empty({max_rows, weight.size(1)}, weight.options().dtype(dtype));
    if (index_.has_value() && weight.scalar_type() != dtype) {
      native_ = at::empty({max_rows, weight.size(1)}, weight.options());
    }
  }

  // Row indices into `weight` of the chunk's classes [c0, c0 + n) (class_index only).
  at::Tensor row_ids(int64_t c0, int64_t n) const {
    const at::Tensor cls = index_->narrow(0, c0, n);
    if (k_ == 1) return cls;
    return cls.mul(k_).unsqueeze(1).add(at::arange(k_, cls.options())).reshape(-1);
  }

  at::Tensor load(int64_t c0, int64_t n) {
    const int64_t rows = n * k_;
    if (direct_) return weight_.narrow(0, c0 * k_, rows);
    at::Tensor out = buffer_.narrow(0, 0, rows);
    if (!index_.has_value()) {
      out.copy_(weight_.narrow(0, c0 * k_, rows));
    } else if (weight_.scalar_type() == dtype_) {
      at::index_select_out(out, weight_, 0, row_ids(c0, n));
    } else {
      at::Tensor native = native_.narrow(0, 0, rows);
      at::index_select_out(native, weight_, 0, row_ids(c0, n));
      out.copy_(native);
    }
    return out;
  }

 private:
  at::Tensor weight_;
  c10::optional<at::Tensor> index_;
  int64_t k_;
  at::ScalarType dtype_;
  bool direct_;
  at::Tensor buffer_, native_;
};

}  // namespace fused_margin
