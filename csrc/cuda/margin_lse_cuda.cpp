// CUDA implementation of fused_margin_C::margin_lse_fwd / margin_lse_bwd.
//
// The robust path next to the Triton kernels: the classes are cut into chunks; per
// chunk, cuBLAS (through ATen, so TF32 / reduced-precision settings are the user's)
// computes the (B x chunk) tile of dot products in fp32 (fp16 / bf16 inputs with fp32
// output), and the kernels of epilogue.cu consume it: an online logsumexp in the
// forward; in the backward, G = dU * r * q in place, then two GEMMs accumulate dX and
// write the chunk's dW rows. Chunks run in order on the current stream, so every
// result is run-to-run deterministic (atomics only where class_index repeats a class).
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>

#include "../backward_args.h"
#include "../chunk_rows.h"
#include "../entry_points.h"
#include "../input_checks.h"
#include "../margin_params.h"
#include "epilogue.cuh"

// mm(out_dtype=float32) for fp16 / bf16 inputs (cuBLAS with an fp32 C): torch >= 2.8.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define FUSED_MARGIN_MM_OUT_DTYPE 1
#else
#define FUSED_MARGIN_MM_OUT_DTYPE 0
#endif

namespace fused_margin {
namespace cuda {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------
// Validation at the boundary (messages name the argument): ../input_checks.h (kCudaChecks)
// ---------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------
// Types, chunks, GEMMs
// ---------------------------------------------------------------------------------

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fused_margin cuda backend: unsupported dtype ", t);
  }
}

at::ScalarType acc_dtype(const Tensor& x, const Tensor& weight) {
  return (x.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// The GEMMs' input dtype: the inputs' common dtype (fp16 with bf16 gives fp32).
at::ScalarType gemm_dtype(const Tensor& x, const Tensor& weight) {
  if (x.scalar_type() == weight.scalar_type()) return x.scalar_type();
  const at::ScalarType promoted = c10::promoteTypes(x.scalar_type(), weight.scalar_type());
  return promoted == at::kHalf || promoted == at::kBFloat16 ? at::kFloat : promoted;
}

// Classes per chunk: a (B x chunk*K) fp32 tile of about 32 MiB -- big enough to keep
// cuBLAS at full speed, small enough to stay mostly in L2 for the epilogue.
int64_t chunk_classes(int64_t batch, int64_t k, int64_t requested) {
  if (requested > 0) return requested;
  const int64_t tile_elems = int64_t(8) << 20;
  int64_t rows = tile_elems / std::max<int64_t>(batch, 1);
  rows = std::clamp<int64_t>(rows / 256 * 256, 2048, 65536);
  return std::max<int64_t>(1, rows / k);
}

// out (acc) = a @ b with a, b in the GEMM dtype: fp32 output from fp16 / bf16 inputs.
void gemm_into(Tensor& out, const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == out.scalar_type()) {
    at::mm_out(out, a, b);
    return;
  }
#if FUSED_MARGIN_MM_OUT_DTYPE
  at::mm_out(out, a, b, out.scalar_type());
#else
  at::mm_out(out, a.to(out.scalar_type()), b.to(out.scalar_type()));
#endif
}

// The weight rows of a chunk in the GEMM dtype: ChunkRows (../chunk_rows.h).

const void* ptr_or_null(const c10::optional<Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

struct Prepared {
  at::ScalarType acc, gd;
  Tensor x;  // (B, D) in the GEMM dtype
  Tensor weight, labels;
  c10::optional<Tensor> class_index, bias, threshold;
};

Prepared prepare(const Tensor& x, const Tensor& weight, const Tensor& labels, const c10::optional<Tensor>& bias,
                 const c10::optional<Tensor>& class_index, const c10::optional<Tensor>& row_threshold) {
  Prepared s;
  s.acc = acc_dtype(x, weight);
  s.gd = gemm_dtype(x, weight);
  s.x = x.detach().to(s.gd).contiguous();
  s.weight = weight.detach();  // any strides: ChunkRows copies a strided chunk, not all of W
  s.labels = labels.contiguous();
  if (class_index.has_value()) s.class_index = class_index->contiguous();
  if (bias.has_value()) {
    const Tensor b = s.class_index.has_value() ? bias->index_select(0, *s.class_index) : *bias;
    s.bias = b.detach().to(s.acc).contiguous();
  }
  if (row_threshold.has_value()) s.threshold = row_threshold->to(s.acc).contiguous();
  return s;
}

// The kernels' view of the chunk of classes [c0, c0 + n) (K sub-centers each): `tile`
// (B, n*K) holds its dot products, `q` its column scales; the rows' inputs come from `s`.
ChunkArgs chunk_args(const Prepared& s, const Tensor& tile, int64_t c0, int64_t n, int64_t k, const Tensor& row_scale,
                     const Tensor& q) {
  return ChunkArgs{tile.data_ptr(),
                   tile.size(0),
                   n,
                   c0,
                   k,
                   row_scale.data_ptr(),
                   ptr_or_null(s.threshold),
                   s.labels.data_ptr<int64_t>(),
                   q.data_ptr(),
                   s.bias.has_value() ? s.bias->narrow(0, c0, n).data_ptr() : nullptr};
}

// ---------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------

ForwardOutputs forward(const ForwardArgs& a) {
  const MarginParams& p = a.params;
  const int64_t classes = a.classes;
  const c10::cuda::CUDAGuard device_guard(a.x.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs are detached; no graph here
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Prepared s = prepare(a.x, a.weight, a.labels, a.bias, a.class_index, a.row_threshold);
  const int64_t batch = s.x.size(0), dim = s.x.size(1), k = p.num_subcenters;
  const auto acc_opts = s.x.options().dtype(s.acc);
  const DType acc = dtype_of(s.acc);

  Tensor row_scale = at::ones({batch}, acc_opts);
  if (p.normalize_x) inverse_row_norms(s.x.data_ptr(), dtype_of(s.gd), batch, dim, row_scale.data_ptr(), acc, stream);
  Tensor col_scale = at::ones({classes * k}, acc_opts);
  Tensor target_u = at::zeros({batch}, acc_opts);
  Tensor lse_neg = at::empty({batch}, acc_opts);
  Tensor sum_neg = at::empty({batch}, acc_opts);
  Tensor argmax = at::empty({batch}, s.labels.options());
  if (batch == 0) return {lse_neg, target_u, sum_neg, argmax, row_scale, col_scale};

  const int64_t chunk = std::min(chunk_classes(batch, k, a.chunk_size), classes);
  Tensor state_f64 = at::empty({4, batch}, acc_opts.dtype(at::kDouble));
  Tensor state_index = at::empty({batch}, s.labels.options());
  const RowStates states{state_f64[0].data_ptr<double>(), state_f64[1].data_ptr<double>(),
                         state_f64[2].data_ptr<double>(), state_f64[3].data_ptr<double>(),
                         state_index.data_ptr<int64_t>()};
  init_row_states(states, batch, stream);
  // per (segment, row): max, sumexp, sum, best (acc) + best index (int64)
  const int64_t partial_bytes = forward_segments(chunk) * batch * (4 * int64_t(at::elementSize(s.acc)) + 8);
  Tensor segment_buffer = at::empty({partial_bytes}, s.x.options().dtype(at::kByte));
  Tensor tile_buffer = at::empty({batch * chunk * k}, acc_opts);
  ChunkRows chunk_rows(s.weight, s.class_index, k, s.gd, chunk * k);

  for (int64_t c0 = 0; c0 < classes; c0 += chunk) {
    const int64_t n = std::min(chunk, classes - c0), rows = n * k;
    const Tensor w = chunk_rows.load(c0, n);
    Tensor q = col_scale.narrow(0, c0 * k, rows);
    if (p.normalize_w) inverse_row_norms(w.data_ptr(), dtype_of(s.gd), rows, dim, q.data_ptr(), acc, stream);
    Tensor tile = tile_buffer.narrow(0, 0, batch * rows).view({batch, rows});
    gemm_into(tile, s.x, w.t());
    forward_chunk(chunk_args(s, tile, c0, n, k, row_scale, q), p, acc, states, target_u.data_ptr(),
                  segment_buffer.data_ptr(), stream);
  }
  finalize_rows(states, batch, acc, lse_neg.data_ptr(), sum_neg.data_ptr(), argmax.data_ptr<int64_t>(), stream);
  return {lse_neg, target_u, sum_neg, argmax, row_scale, col_scale};
}

// ---------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------

// The fused update's view of a tensor for the kernels: (pointer, strides).
void set_strided(const Tensor& t, void** ptr, int64_t* strides) {
  *ptr = t.data_ptr();
  strides[0] = t.stride(0);
  strides[1] = t.stride(1);
}

BackwardOutputs backward(const BackwardArgs& a) {
  const MarginParams& p = a.params;
  const Tensor& x_in = a.x;
  const c10::optional<Tensor>& bias_in = a.bias;
  const int64_t classes = a.classes;
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // inputs are detached; no graph here
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Prepared s = prepare(x_in, a.weight, a.labels, bias_in, a.class_index, a.row_threshold);
  const int64_t batch = s.x.size(0), dim = s.x.size(1), k = p.num_subcenters;
  const auto acc_opts = s.x.options().dtype(s.acc);
  const DType acc = dtype_of(s.acc);
  auto as_acc = [&](const Tensor& v) { return v.detach().to(s.acc).contiguous(); };
  const Tensor grad_lse = as_acc(a.grad_lse), grad_target_u = as_acc(a.grad_target_u);
  const Tensor grad_sum = as_acc(a.grad_sum), lse_neg = as_acc(a.lse_neg);
  const Tensor row_scale = as_acc(a.row_scale), col_scale = as_acc(a.col_scale);
  // A fused optimizer updates the rows in use chunk by chunk, right after each chunk's dW
  // (in the bounded dw_buffer) is formed: no weight gradient. class_index must not
  // repeat a class (the caller checks; here it would cost a device sync).
  const bool fused = a.update.has_value();
  UpdateRowsArgs update_args{};
  if (fused) {
    update_args.dim = dim;
    update_args.storage = dtype_of(a.weight.scalar_type());
    set_strided(a.weight, &update_args.weight, update_args.weight_stride);
    for (size_t i = 0; i < a.update->state.size(); ++i) {
      set_strided(a.update->state[i], &update_args.state[i], update_args.state_stride[i]);
    }
    update_args.guard = a.update->guard.data_ptr<int32_t>();
  }
  const auto update_chunk = [&](const Tensor& dw, const Tensor& w, const void* inv_norm, const Tensor& ids,
                                int64_t first_row) {
    UpdateRowsArgs args = update_args;
    args.grad = dw.data_ptr();
    args.rows = w.data_ptr();
    args.rows_type = dtype_of(w.scalar_type());
    args.inv_norm = inv_norm;
    args.n = dw.size(0);
    args.dst_rows = ids.defined() ? ids.data_ptr<int64_t>() : nullptr;
    args.first_row = first_row;
    // the chunk's gradient is checked whole before any of its rows is written (guard)
    check_rows(args, acc, stream);
    update_rows(args, a.update->scalars, acc, stream);
  };

  // Without class_index every row of grad_weight is written; with it, unused rows are 0.
  // Contiguous whatever weight's strides (project_rows writes whole rows).
  Tensor grad_weight;
  if (!fused) {
    grad_weight = s.class_index.has_value() ? at::zeros(s.weight.sizes(), s.weight.options())
                                            : at::empty(s.weight.sizes(), s.weight.options());
  }
  Tensor grad_bias_used;
  if (s.bias.has_value()) grad_bias_used = at::zeros({classes}, acc_opts);
  Tensor grad_x = at::empty({batch, dim}, x_in.options());
  const int64_t chunk = std::min(chunk_classes(batch, k, a.chunk_size), classes);
  if (batch == 0) {
    if (fused) {
      // No rows, so a zero gradient: the update still applies (weight decay, momentum).
      ChunkRows chunk_rows(s.weight, s.class_index, k, s.gd, chunk * k);
      Tensor dw_buffer = at::zeros({chunk * k, dim}, acc_opts);
      for (int64_t c0 = 0; c0 < classes; c0 += chunk) {
        const int64_t n = std::min(chunk, classes - c0), rows = n * k;
        const Tensor dw = dw_buffer.narrow(0, 0, rows);
        update_chunk(dw, dw, nullptr, s.class_index.has_value() ? chunk_rows.row_ids(c0, n).contiguous() : Tensor(),
                     c0 * k);
      }
    } else {
      grad_weight.zero_();
    }
    Tensor gb = s.bias.has_value() ? at::zeros_like(*bias_in) : at::empty({0}, x_in.options());
    return {grad_x, grad_weight, gb};
  }

  // The dX / dW GEMMs read G in bf16 for bf16 inputs (fp32's range, fp32 accumulation).
  // fp16's range would flush the small entries of G (softmax tails times r * q), so fp16
  // inputs take fp32 GEMMs in the backward, on fp32 copies of the chunk's rows and of x.
  const at::ScalarType grad_gemm = s.gd == at::kHalf ? at::kFloat : s.gd;
  const bool grad_in_place = grad_gemm == s.acc;  // G overwrites the fp32/fp64 tile
  const Tensor x_grad_gemm = s.x.to(grad_gemm);
  Tensor tile_buffer = at::empty({batch * chunk * k}, acc_opts);
  Tensor grad_tile_buffer =
      grad_in_place ? tile_buffer : at::empty({batch * chunk * k}, s.x.options().dtype(grad_gemm));
  Tensor dx = at::zeros({batch, dim}, acc_opts);
  Tensor dx_chunk;
  if (!grad_in_place) dx_chunk = at::empty({batch, dim}, acc_opts);
  Tensor dw_buffer = at::empty({chunk * k, dim}, acc_opts);
  Tensor dw_rows;  // with class_index: the chunk's projected rows, before index_add_
  if (s.class_index.has_value() && !fused) dw_rows = at::empty({chunk * k, dim}, s.weight.options());
  Tensor bias_partials;
  if (s.bias.has_value()) bias_partials = at::empty({backward_row_blocks(batch) * chunk}, acc_opts);
  ChunkRows chunk_rows(s.weight, s.class_index, k, s.gd, chunk * k);
  const RowGradArgs grads{grad_lse.data_ptr(), grad_target_u.data_ptr(), grad_sum.data_ptr(), lse_neg.data_ptr()};

  for (int64_t c0 = 0; c0 < classes; c0 += chunk) {
    const int64_t n = std::min(chunk, classes - c0), rows = n * k;
    const Tensor w = chunk_rows.load(c0, n);
    const Tensor q = col_scale.narrow(0, c0 * k, rows);
    Tensor tile = tile_buffer.narrow(0, 0, batch * rows).view({batch, rows});
    gemm_into(tile, s.x, w.t());
    Tensor grad_tile = grad_tile_buffer.narrow(0, 0, batch * rows).view({batch, rows});
    backward_chunk(chunk_args(s, tile, c0, n, k, row_scale, q), grads, p, acc, grad_tile.data_ptr(),
                   dtype_of(grad_tile.scalar_type()),
                   s.bias.has_value() ? grad_bias_used.narrow(0, c0, n).data_ptr() : nullptr,
                   s.bias.has_value() ? bias_partials.data_ptr() : nullptr, stream);

    // dX += G W_chunk (accumulated in acc); dW_chunk = G^T x, then the tangent projection.
    const Tensor w_grad_gemm = w.to(grad_gemm);
    if (grad_in_place) {
      dx.addmm_(grad_tile, w_grad_gemm);
    } else {
      gemm_into(dx_chunk, grad_tile, w_grad_gemm);
      dx.add_(dx_chunk);
    }
    Tensor dw = dw_buffer.narrow(0, 0, rows);
    gemm_into(dw, grad_tile.t(), x_grad_gemm);
    const void* inv_norm = p.normalize_w ? q.data_ptr() : nullptr;
    if (fused) {
      // dX and dW above have read the chunk's rows (same stream): update them in place,
      // the projection folded into the update kernel.
      update_chunk(dw, w, inv_norm, s.class_index.has_value() ? chunk_rows.row_ids(c0, n).contiguous() : Tensor(),
                   c0 * k);
    } else if (!s.class_index.has_value()) {
      project_rows(dw.data_ptr(), w.data_ptr(), dtype_of(s.gd), inv_norm, rows, dim, grad_weight.data_ptr(),
                   dtype_of(grad_weight.scalar_type()), nullptr, c0 * k, acc, stream);
    } else {
      Tensor out = dw_rows.narrow(0, 0, rows);
      project_rows(dw.data_ptr(), w.data_ptr(), dtype_of(s.gd), inv_norm, rows, dim, out.data_ptr(),
                   dtype_of(out.scalar_type()), nullptr, 0, acc, stream);
      grad_weight.index_add_(0, chunk_rows.row_ids(c0, n), out);  // repeated classes add up
    }
  }
  project_rows(dx.data_ptr(), s.x.data_ptr(), dtype_of(s.gd), p.normalize_x ? row_scale.data_ptr() : nullptr, batch,
               dim, grad_x.data_ptr(), dtype_of(grad_x.scalar_type()), nullptr, 0, acc, stream);

  Tensor grad_bias = at::empty({0}, x_in.options());
  if (s.bias.has_value()) {
    if (s.class_index.has_value()) {
      grad_bias = at::zeros_like(*bias_in).index_add_(0, *s.class_index, grad_bias_used.to(bias_in->scalar_type()));
    } else {
      grad_bias = grad_bias_used.to(bias_in->scalar_type());
    }
  }
  // fused: an undefined grad_weight, nothing W-sized was allocated
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_margin_C, CUDA, m) { EntryPoints<kCudaChecks, &forward, &backward>::register_ops(m); }

}  // namespace cuda
}  // namespace fused_margin
