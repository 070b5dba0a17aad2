// CPU implementation of fused_margin_C::margin_lse_fwd / margin_lse_bwd.
//
// The classes in use are cut into chunks; a chunk's logits tile (B x chunk) comes from
// one ATen GEMM (MKL), is consumed at once by the fused epilogue (epilogue.cpp) while it
// is still in L2, and never exists for all classes at once. Chunks are gathered into a
// fixed number of contiguous groups that depends on the shapes only: threads take whole
// groups (one at a time, from a shared counter), a group runs its chunks in class order
// with single-threaded GEMMs, and the groups' partials (row states, dX) are merged in
// group order -- so results do not depend on the thread count.
//
// Per-op headers instead of <ATen/ATen.h>: a third of the compile time.
#include <ATen/Parallel.h>
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
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "../backward_args.h"
#include "../chunk_rows.h"
#include "../entry_points.h"
#include "../input_checks.h"
#include "../margin_params.h"
#include "../non_target.h"
#include "../optim_update.h"
#include "epilogue.h"

// MKL's per-thread thread count, exported by torch's x86 builds (weak: absent elsewhere).
// The C entry point: mkl_service.h maps mkl_set_num_threads_local to it, while the
// exported lowercase symbol is the Fortran one (argument by pointer).
#if defined(__GNUC__) && !defined(_WIN32)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#define FM_MKL_LOCAL_THREADS 1
#else
#define FM_MKL_LOCAL_THREADS 0
#endif

namespace fused_margin {
namespace cpu {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------
// Validation at the boundary (messages name the argument): ../input_checks.h (kCpuChecks)
// ---------------------------------------------------------------------------------

// class_index values must be valid rows; returns whether they are all distinct (then a
// chunk's weight-gradient rows can be written in place by the thread that owns it).
bool check_class_index(const Tensor& class_index, int64_t classes_all) {
  const int64_t* idx = class_index.data_ptr<int64_t>();
  std::vector<bool> seen(classes_all, false);
  bool unique = true;
  for (int64_t i = 0; i < class_index.numel(); ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < classes_all, "fused_margin cpu backend: class_index[", i, "] = ", idx[i],
                " is not a class of weight (", classes_all, " classes)");
    unique = unique && !seen[idx[i]];
    seen[idx[i]] = true;
  }
  return unique;
}

// Inside a group, each GEMM runs on the calling thread. MKL otherwise picks its own
// split for the thread count it sees -- splitting the inner dimension of the dX GEMM
// (K = the chunk's rows) changes its summation order, so results would depend on the
// thread count. The setting is thread-local and is restored on exit: the
// process-wide settings stay the user's.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() {
#if FM_MKL_LOCAL_THREADS
    if (MKL_Set_Num_Threads_Local != nullptr) previous_ = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~SingleThreadedBlas() {
#if FM_MKL_LOCAL_THREADS
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
#endif
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = 0;  // 0: back to the global setting
};

// ---------------------------------------------------------------------------------
// Chunking
// ---------------------------------------------------------------------------------

int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    long value = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    value = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (value <= 0) value = 1 << 20;
    return std::clamp<int64_t>(value, 256 << 10, 8 << 20);
  }();
  return bytes;
}

struct Plan {
  int64_t classes;  // C
  int64_t chunk;    // classes per chunk
  int64_t num_chunks;
  int64_t num_groups;

  int64_t group_begin(int64_t g) const { return g * num_chunks / num_groups; }
};

// Classes per chunk: the tile (B x chunk*K) and the chunk's weight rows (chunk*K x D)
// should fit in half the L2 together, so that the GEMM leaves them where the epilogue
// (and in the backward the next two GEMMs) read them. A function of the shapes and the
// machine, never of the thread count.
int64_t chunk_classes(int64_t batch, int64_t dim, int64_t k, int64_t elem_bytes, int64_t requested) {
  if (requested > 0) return requested;
  int64_t rows = (l2_cache_bytes() / 2) / ((batch + dim) * elem_bytes);
  rows = std::clamp<int64_t>(rows / 16 * 16, 64, 4096);  // whole SIMD/GEMM panels; skinny GEMMs are slow
  return std::max<int64_t>(1, rows / k);
}

Plan make_plan(int64_t classes, int64_t chunk, int64_t max_groups) {
  Plan plan;
  plan.classes = classes;
  plan.chunk = std::min(chunk, classes);
  plan.num_chunks = (classes + plan.chunk - 1) / plan.chunk;
  plan.num_groups = std::max<int64_t>(1, std::min(plan.num_chunks, max_groups));
  return plan;
}

// Forward groups: each carries B row states (40 bytes each); 256 keeps every thread of a
// large machine busy.
constexpr int64_t kMaxForwardGroups = 256;
// Backward groups: each carries a (B, D) partial dX (fresh pages, summed at the end):
// as many as fit in 16 MiB, but at least 8 (parallelism for large B) and at most 64.
constexpr int64_t kBackwardPartialBytes = int64_t(16) << 20;

// Weight rows of a chunk, in the accumulation dtype: ChunkRows (../chunk_rows.h).

at::ScalarType acc_dtype(const Tensor& x, const Tensor& weight) {
  return (x.scalar_type() == at::kDouble || weight.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

template <typename T>
Tensor inverse_row_norms(const Tensor& rows) {
  Tensor out = at::empty({rows.size(0)}, rows.options());
  const T* src = rows.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const int64_t dim = rows.size(1);
  at::parallel_for(0, rows.size(0), 64, [&](int64_t b0, int64_t b1) {
    inv_row_norms(src + b0 * dim, b1 - b0, dim, dst + b0);
  });
  return out;
}

// Per-row bias of the classes in use, in the accumulation dtype (O(C)).
c10::optional<Tensor> bias_in_use(const c10::optional<Tensor>& bias, const c10::optional<Tensor>& class_index,
                                  at::ScalarType acc) {
  if (!bias.has_value()) return c10::nullopt;
  Tensor b = class_index.has_value() ? bias->index_select(0, *class_index) : *bias;
  return b.to(acc).contiguous();
}

// A thread's workspace for the chunk epilogues (epilogue.h), and the ChunkTile it hands
// them for each chunk: the chunk's tile, column scales and bias next to the rows' inputs
// (acc dtype, contiguous) that every chunk reads.
template <typename T>
class EpilogueWorkspace {
 public:
  EpilogueWorkspace(int64_t chunk, const Tensor& row_scale, const c10::optional<Tensor>& threshold,
                    const Tensor& labels, const c10::optional<Tensor>& bias)
      : row_scale_(row_scale.data_ptr<T>()),
        threshold_(threshold.has_value() ? threshold->data_ptr<T>() : nullptr),
        labels_(labels.data_ptr<int64_t>()),
        bias_(bias.has_value() ? bias->data_ptr<T>() : nullptr),
        scratch_(3 * chunk),
        best_sub_(chunk),
        no_bias_(bias.has_value() ? 0 : chunk, T(0)) {}

  // The chunk of classes [c0, c0 + n): `tile` (B, n*K) holds its dot products, `q` its
  // column scales.
  ChunkTile<T> chunk(const Tensor& tile, int64_t c0, int64_t n, const T* q) {
    return ChunkTile<T>{tile.data_ptr<T>(), tile.size(0), n, c0, row_scale_, threshold_, labels_, q,
                        bias_ != nullptr ? bias_ + c0 : no_bias_.data(), scratch_.data(), best_sub_.data()};
  }

 private:
  const T* row_scale_;
  const T* threshold_;  // nullptr without row_threshold
  const int64_t* labels_;
  const T* bias_;  // nullptr without bias: the chunk reads no_bias_
  std::vector<T> scratch_;
  std::vector<int32_t> best_sub_;
  std::vector<T> no_bias_;
};

// ---------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------

template <typename T>
ForwardOutputs forward_impl(const ForwardArgs& a) {
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const MarginParams& p = a.params;
  const int64_t batch = a.x.size(0), dim = a.x.size(1), k = p.num_subcenters, classes = a.classes;
  // Detached: the GEMMs below run on worker threads, where no autograd state is set up.
  const Tensor x = a.x.detach().to(acc).contiguous();
  const Tensor weight = a.weight.detach();  // any strides: ChunkRows copies a strided chunk, not all of W
  const Tensor labels = a.labels.contiguous();
  c10::optional<Tensor> class_index;
  if (a.class_index.has_value()) {
    class_index = a.class_index->contiguous();
    check_class_index(*class_index, weight.size(0) / k);
  }
  const c10::optional<Tensor> bias = bias_in_use(a.bias, class_index, acc);
  c10::optional<Tensor> threshold;
  if (a.row_threshold.has_value()) threshold = a.row_threshold->to(acc).contiguous();

  const Tensor row_scale = p.normalize_x ? inverse_row_norms<T>(x) : at::ones({batch}, x.options());
  Tensor col_scale = at::empty({classes * k}, x.options());
  Tensor target_u = at::zeros({batch}, x.options());
  Tensor lse_neg = at::empty({batch}, x.options());
  Tensor sum_neg = at::empty({batch}, x.options());
  Tensor argmax = at::zeros({batch}, labels.options());
  if (batch == 0) return {lse_neg, target_u, sum_neg, argmax, row_scale, col_scale.fill_(1)};

  const Plan plan = make_plan(classes, chunk_classes(batch, dim, k, sizeof(T), a.chunk_size), kMaxForwardGroups);
  std::vector<RowState> states(plan.num_groups * batch);

  std::atomic<int64_t> next_group{0};
  at::parallel_for(0, plan.num_groups, 1, [&](int64_t /*g0*/, int64_t /*g1*/) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // thread-local: this may be a worker thread
    SingleThreadedBlas one_blas_thread;
    ChunkRows chunk_rows(weight, class_index, k, acc, plan.chunk * k);
    Tensor tile_buffer = at::empty({batch * plan.chunk * k}, x.options());
    EpilogueWorkspace<T> epilogue(plan.chunk, row_scale, threshold, labels, bias);
    // Groups are handed out one at a time (not the static split of parallel_for): a
    // preempted or slower thread does not hold back the others. The result of a group
    // does not depend on which thread ran it.
    for (int64_t g; (g = next_group.fetch_add(1)) < plan.num_groups;) {
      for (int64_t c = plan.group_begin(g); c < plan.group_begin(g + 1); ++c) {
        const int64_t c0 = c * plan.chunk, n = std::min(plan.chunk, classes - c0);
        const Tensor w = chunk_rows.load(c0, n);
        T* q = col_scale.data_ptr<T>() + c0 * k;
        if (p.normalize_w) {
          inv_row_norms(w.data_ptr<T>(), n * k, dim, q);
        } else {
          std::fill(q, q + n * k, T(1));
        }
        Tensor tile = tile_buffer.narrow(0, 0, batch * n * k).view({batch, n * k});
        at::mm_out(tile, x, w.t());
        // Each row's target lies in one chunk: one writer per target_u entry.
        forward_epilogue(epilogue.chunk(tile, c0, n, q), p, states.data() + g * batch, target_u.data_ptr<T>());
      }
    }
  });

  // Merge the groups' row states in group order.
  T* lse_p = lse_neg.data_ptr<T>();
  T* sum_p = sum_neg.data_ptr<T>();
  int64_t* arg_p = argmax.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    RowState total = states[b];
    for (int64_t g = 1; g < plan.num_groups; ++g) {
      const RowState& s = states[g * batch + b];
      lse_merge(total.max, total.sumexp, s.max, s.sumexp);
      total.sum += s.sum;
      if (s.best > total.best) {
        total.best = s.best;
        total.best_index = s.best_index;
      }
    }
    // No negative class (C = 1 with a target, an ignored row): lse_neg = -inf. A NaN or
    // +inf logit gives a NaN sum of exponentials: NaN, never the -inf of an empty row.
    const bool has_terms = total.sumexp > 0.0 || std::isnan(total.sumexp);
    lse_p[b] = has_terms ? T(total.max + std::log(total.sumexp)) : -std::numeric_limits<T>::infinity();
    sum_p[b] = T(total.sum);
    arg_p[b] = std::max<int64_t>(total.best_index, 0);
  }
  return {lse_neg, target_u, sum_neg, argmax, row_scale, col_scale};
}

// ---------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------

// A fused update of the chunk's weight rows: grad (rows, dim) acc, contiguous, the rows'
// final gradient; the rows are `row_ids[i]` (class_index) or first_row + i of weight.
// Weight and state are read in their own dtype S, the rule runs in T and each result is
// rounded once.
template <typename T, typename S>
void update_rows_as(const UpdateRule<T>& rule, const T* grad, int64_t rows, int64_t dim, const int64_t* row_ids,
                    int64_t first_row, const Tensor& weight, const std::vector<Tensor>& state) {
  S* w = static_cast<S*>(weight.data_ptr());
  const int64_t ws0 = weight.stride(0), ws1 = weight.stride(1);
  S* s0 = state.size() > 0 ? static_cast<S*>(state[0].data_ptr()) : nullptr;
  S* s1 = state.size() > 1 ? static_cast<S*>(state[1].data_ptr()) : nullptr;
  const int64_t a0 = s0 ? state[0].stride(0) : 0, a1 = s0 ? state[0].stride(1) : 0;
  const int64_t b0 = s1 ? state[1].stride(0) : 0, b1 = s1 ? state[1].stride(1) : 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t r = row_ids != nullptr ? row_ids[i] : first_row + i;
    const T* g = grad + i * dim;
    S* wr = w + r * ws0;
    S* m = s0 ? s0 + r * a0 : nullptr;
    S* v = s1 ? s1 + r * b0 : nullptr;
    for (int64_t d = 0; d < dim; ++d) {
      T wv = static_cast<T>(wr[d * ws1]);
      T mv = m ? static_cast<T>(m[d * a1]) : T(0);
      T vv = v ? static_cast<T>(v[d * b1]) : T(0);
      rule.apply(wv, g[d], mv, vv);
      wr[d * ws1] = static_cast<S>(wv);
      if (m) m[d * a1] = static_cast<S>(mv);
      if (v) v[d * b1] = static_cast<S>(vv);
    }
  }
}

template <typename T>
void update_rows(const UpdateRule<T>& rule, const T* grad, int64_t rows, int64_t dim, const int64_t* row_ids,
                 int64_t first_row, const Tensor& weight, const std::vector<Tensor>& state) {
  switch (weight.scalar_type()) {
    case at::kFloat: return update_rows_as<T, float>(rule, grad, rows, dim, row_ids, first_row, weight, state);
    case at::kDouble: return update_rows_as<T, double>(rule, grad, rows, dim, row_ids, first_row, weight, state);
    case at::kBFloat16:
      return update_rows_as<T, c10::BFloat16>(rule, grad, rows, dim, row_ids, first_row, weight, state);
    case at::kHalf: return update_rows_as<T, c10::Half>(rule, grad, rows, dim, row_ids, first_row, weight, state);
    default: TORCH_CHECK(false, "fused_margin cpu backend: a fused update does not support weight dtype ",
                         weight.scalar_type());
  }
}

// Whether the n values at p are all finite (the fused update's check of a chunk's gradient).
template <typename T>
bool all_finite(const T* p, int64_t n) {
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) finite &= std::isfinite(p[i]);  // branch-free
  return finite;
}

template <typename T>
BackwardOutputs backward_impl(const BackwardArgs& a) {
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const MarginParams& p = a.params;
  const Tensor& x_in = a.x;
  const c10::optional<Tensor>& bias_in = a.bias;
  const int64_t batch = x_in.size(0), dim = x_in.size(1), k = p.num_subcenters, classes = a.classes;
  const int64_t classes_all = a.weight.size(0) / k;
  const Tensor x = x_in.detach().to(acc).contiguous();
  const Tensor weight = a.weight.detach();
  const Tensor labels = a.labels.contiguous();
  auto as_acc = [&](const Tensor& t) { return t.detach().to(acc).contiguous(); };
  const Tensor grad_lse = as_acc(a.grad_lse), grad_target_u = as_acc(a.grad_target_u);
  const Tensor grad_sum = as_acc(a.grad_sum), lse_neg = as_acc(a.lse_neg);
  const Tensor row_scale = as_acc(a.row_scale), col_scale = as_acc(a.col_scale);
  c10::optional<Tensor> class_index;
  bool unique_index = true;
  if (a.class_index.has_value()) {
    class_index = a.class_index->contiguous();
    unique_index = check_class_index(*class_index, classes_all);
  }
  // A fused optimizer updates the rows in use chunk by chunk, right after each chunk's
  // gradient is formed (in the chunk's bounded dw_buffer) and used: no weight gradient.
  const bool fused = a.update.has_value();
  TORCH_CHECK(!fused || unique_index,
              "fused_margin cpu backend: class_index repeats a class, which a fused update cannot take (each row "
              "is updated once, with its whole gradient)");
  c10::optional<UpdateRule<T>> rule;
  if (fused) rule = UpdateRule<T>::make(a.update->scalars);
  // The guard (optim_update.h): each chunk's gradient is checked before its rows are
  // written; a non-finite one is not applied, and no chunk is written after it. Chunks of
  // other groups may already have been (guard[kGuardWritten] says so).
  int32_t* guard = fused ? a.update->guard.data_ptr<int32_t>() : nullptr;
  std::atomic<int32_t> status{fused ? guard[kGuardStatus] : 0};
  std::atomic<bool> wrote{false};
  const c10::optional<Tensor> bias = bias_in_use(bias_in, class_index, acc);
  c10::optional<Tensor> threshold;
  if (a.row_threshold.has_value()) threshold = as_acc(*a.row_threshold);

  // Rows of weight not in use get 0; without class_index every row is written.
  Tensor grad_weight;
  if (!fused) grad_weight = class_index.has_value() ? at::zeros_like(weight) : at::empty_like(weight);
  // Where several chunks may hit one weight row (repeated class_index entries), the
  // chunks write a (C*K, D) buffer that index_add_ folds in afterwards.
  Tensor grad_weight_used;
  if (!unique_index) grad_weight_used = at::empty({classes * k, dim}, x.options());
  Tensor grad_bias_used;
  if (bias.has_value()) grad_bias_used = at::zeros({classes}, x.options());

  const int64_t chunk = chunk_classes(batch, dim, k, sizeof(T), a.chunk_size);
  const int64_t partial_bytes = std::max<int64_t>(1, batch * dim * int64_t(sizeof(T)));
  const int64_t max_groups = std::clamp<int64_t>(kBackwardPartialBytes / partial_bytes, 8, 64);
  const Plan plan = make_plan(classes, chunk, max_groups);
  // dX partials: group 0 accumulates into grad_x_acc itself.
  // (every group has at least one chunk, whose GEMM writes its partial: no zeroing)
  Tensor grad_x_acc = at::empty({batch, dim}, x.options());
  Tensor partials;
  if (plan.num_groups > 1) partials = at::empty({plan.num_groups - 1, batch, dim}, x.options());
  // In-place GEMM output: the weight gradient rows of a chunk are contiguous in grad_weight
  // (grad_weight has weight's strides, as the op's fake kernel says).
  const bool write_in_place =
      !fused && !class_index.has_value() && weight.scalar_type() == acc && grad_weight.is_contiguous();
  const bool use_dw_buffer = !write_in_place && unique_index;

  std::atomic<int64_t> next_group{0};
  at::parallel_for(0, plan.num_groups, 1, [&](int64_t /*g0*/, int64_t /*g1*/) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    SingleThreadedBlas one_blas_thread;
    ChunkRows chunk_rows(weight, class_index, k, acc, plan.chunk * k);
    Tensor tile_buffer = at::empty({batch * plan.chunk * k}, x.options());
    Tensor dw_buffer;
    if (use_dw_buffer) dw_buffer = at::empty({plan.chunk * k, dim}, x.options());
    EpilogueWorkspace<T> epilogue(plan.chunk, row_scale, threshold, labels, bias);
    // Groups are handed out one at a time (not the static split of parallel_for): a
    // preempted or slower thread does not hold back the others. The result of a group
    // does not depend on which thread ran it.
    for (int64_t g; (g = next_group.fetch_add(1)) < plan.num_groups;) {
      Tensor grad_x_group = g == 0 ? grad_x_acc : partials[g - 1];
      for (int64_t c = plan.group_begin(g); c < plan.group_begin(g + 1); ++c) {
        const int64_t c0 = c * plan.chunk, n = std::min(plan.chunk, classes - c0), rows = n * k;
        const Tensor w = chunk_rows.load(c0, n);
        Tensor tile = tile_buffer.narrow(0, 0, batch * rows).view({batch, rows});
        at::mm_out(tile, x, w.t());
        const T* q = col_scale.data_ptr<T>() + c0 * k;
        RowGrads<T> rg{grad_lse.data_ptr<T>(), grad_target_u.data_ptr<T>(), grad_sum.data_ptr<T>(),
                       lse_neg.data_ptr<T>(), bias.has_value() ? grad_bias_used.data_ptr<T>() + c0 : nullptr};
        backward_epilogue(epilogue.chunk(tile, c0, n, q), p, rg);  // tile := G = dU * r_b * q_i

        // dX += G W_chunk;  dW_chunk = G^T x (both through the folded scales, see epilogue.h).
        if (c == plan.group_begin(g)) {
          at::mm_out(grad_x_group, tile, w);
        } else {
          grad_x_group.addmm_(tile, w);
        }
        Tensor dw;
        if (write_in_place) {
          dw = grad_weight.narrow(0, c0 * k, rows);
        } else if (use_dw_buffer) {
          dw = dw_buffer.narrow(0, 0, rows);
        } else {
          dw = grad_weight_used.narrow(0, c0 * k, rows);
        }
        at::mm_out(dw, tile.t(), x);
        if (p.normalize_w) remove_radial(dw.data_ptr<T>(), w.data_ptr<T>(), q, rows, dim);
        if (fused) {
          // The chunk's rows are done with (dX and dW above read them): update them, and
          // their state, in place. Chunks own disjoint rows, so threads never meet.
          if (status.load() != 0) continue;
          if (!all_finite(dw.data_ptr<T>(), rows * dim)) {
            status.fetch_or(kGuardNonFiniteGradient);
            continue;
          }
          Tensor ids;
          if (class_index.has_value()) ids = chunk_rows.row_ids(c0, n).contiguous();
          wrote.store(true);
          update_rows<T>(*rule, dw.data_ptr<T>(), rows, dim, ids.defined() ? ids.data_ptr<int64_t>() : nullptr,
                         c0 * k, a.weight, a.update->state);
        } else if (use_dw_buffer) {
          if (class_index.has_value()) {
            // Distinct rows: threads write disjoint rows of grad_weight.
            grad_weight.index_copy_(0, chunk_rows.row_ids(c0, n), dw.to(weight.scalar_type()));
          } else {
            grad_weight.narrow(0, c0 * k, rows).copy_(dw);
          }
        }
      }
    }
  });

  if (fused) {
    guard[kGuardStatus] = status.load();
    if (wrote.load()) guard[kGuardWritten] = 1;
  }

  // dX = the groups' partials summed in group order, then the folded-norm projection.
  // One parallel region over rows (not one per partial: each region ends on a barrier,
  // which costs a scheduler tick whenever a thread is preempted).
  {
    T* dx = grad_x_acc.data_ptr<T>();
    const T* part = plan.num_groups > 1 ? partials.data_ptr<T>() : nullptr;
    const int64_t stride = batch * dim;
    at::parallel_for(0, batch, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t g = 1; g < plan.num_groups; ++g) {
        const T* src = part + (g - 1) * stride;
        for (int64_t i = b0 * dim; i < b1 * dim; ++i) dx[i] += src[i];
      }
      if (p.normalize_x) {
        remove_radial(dx + b0 * dim, x.data_ptr<T>() + b0 * dim, row_scale.data_ptr<T>() + b0, b1 - b0, dim);
      }
    });
  }
  if (!unique_index) {  // never fused (refused above)
    const Tensor all_rows = class_index->mul(k).unsqueeze(1).add(at::arange(k, class_index->options())).reshape(-1);
    grad_weight.index_add_(0, all_rows, grad_weight_used.to(weight.scalar_type()));
  }
  Tensor grad_bias = at::empty({0}, x_in.options());
  if (bias.has_value()) {
    if (class_index.has_value()) {
      grad_bias = at::zeros_like(*bias_in).index_add_(0, *class_index, grad_bias_used.to(bias_in->scalar_type()));
    } else {
      grad_bias = grad_bias_used.to(bias_in->scalar_type());
    }
  }
  // fused: an undefined grad_weight (None in Python), nothing W-sized was allocated
  return {grad_x_acc.to(x_in.scalar_type()), grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------------
// Op entry points: the accumulation dtype's dispatch, under ../entry_points.h
// ---------------------------------------------------------------------------------

ForwardOutputs forward(const ForwardArgs& a) {
  if (acc_dtype(a.x, a.weight) == at::kDouble) return forward_impl<double>(a);
  return forward_impl<float>(a);
}

BackwardOutputs backward(const BackwardArgs& a) {
  if (acc_dtype(a.x, a.weight) == at::kDouble) return backward_impl<double>(a);
  return backward_impl<float>(a);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_margin_C, CPU, m) { EntryPoints<kCpuChecks, &forward, &backward>::register_ops(m); }

}  // namespace cpu
}  // namespace fused_margin
