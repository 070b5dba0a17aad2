// CUDA kernels of the fused operation (see epilogue.cuh). No torch headers.
//
// Every reduction has a fixed shape (thread -> warp shuffle tree -> block -> segments
// in order -> chunks in order): results are run-to-run deterministic, with no atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../non_target.h"
#include "epilogue.cuh"

namespace fused_margin {
namespace cuda {
namespace {

constexpr int kThreads = 256;              // threads per block
constexpr int kItems = 8;                  // classes per thread in a forward segment
constexpr int kSegment = kThreads * kItems;  // classes per forward segment
constexpr int kRowsPerBlock = 32;          // rows per backward block
constexpr int kWarps = kThreads / 32;

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fused_margin cuda backend: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

// ---- storage conversions -------------------------------------------------------

// A stored value in the type arithmetic reads it in: 16-bit types as float (exact).
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }

// Element i of storage type T in the accumulation type A.
template <typename A, typename T>
__device__ __forceinline__ A load(const T* p, int64_t i) {
  return static_cast<A>(widen(p[i]));
}

// v rounded once to the storage type T (round to nearest), but double to bfloat16, which
// goes through float.
template <typename T, typename A>
__device__ __forceinline__ T store_as(A v) {
  if constexpr (std::is_same_v<T, __half> && std::is_same_v<A, double>) {
    return __double2half(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return -static_cast<A>(INFINITY);
}

// ---- reductions --------------------------------------------------------------------

template <typename A>
struct Partial {
  A max;     // of the non-target z
  A sumexp;  // sum exp(z - max)
  A sum;     // sum of the non-target z
  A best;    // max plain logit
  int64_t best_index;
};

template <typename A>
__device__ __forceinline__ Partial<A> combine(const Partial<A>& a, const Partial<A>& b) {
  Partial<A> out = a;
  lse_merge(out.max, out.sumexp, b.max, b.sumexp);
  out.sum = a.sum + b.sum;
  const bool take_b = b.best > a.best || (b.best == a.best && b.best_index < a.best_index);
  out.best = take_b ? b.best : a.best;
  out.best_index = take_b ? b.best_index : a.best_index;
  return out;
}

template <typename A>
__device__ __forceinline__ Partial<A> shuffle_down(const Partial<A>& p, int offset) {
  Partial<A> o;
  o.max = __shfl_down_sync(0xffffffffu, p.max, offset);
  o.sumexp = __shfl_down_sync(0xffffffffu, p.sumexp, offset);
  o.sum = __shfl_down_sync(0xffffffffu, p.sum, offset);
  o.best = __shfl_down_sync(0xffffffffu, p.best, offset);
  o.best_index = __shfl_down_sync(0xffffffffu, p.best_index, offset);
  return o;
}

// ---- the chunk -------------------------------------------------------------------

// ChunkArgs (epilogue.cuh) with its pointers in the accumulation type A: the part of the
// forward's and the backward's kernel arguments that describes the chunk.
template <typename A>
struct TypedChunk {
  const A* tile;
  int64_t num_rows, num_classes, first_class, k;
  const A* row_scale;
  const A* row_threshold;
  const int64_t* labels;
  const A* col_scale;
  const A* bias;
};

template <typename A>
TypedChunk<A> typed_chunk(const ChunkArgs& c) {
  return TypedChunk<A>{static_cast<const A*>(c.tile),
                       c.num_rows,
                       c.num_classes,
                       c.first_class,
                       c.num_subcenters,
                       static_cast<const A*>(c.row_scale),
                       static_cast<const A*>(c.row_threshold),
                       c.labels,
                       static_cast<const A*>(c.col_scale),
                       static_cast<const A*>(c.bias)};
}

// ---- forward ----------------------------------------------------------------------

template <typename A>
struct ForwardKernelArgs : TypedChunk<A> {
  A* target_u;
  Partial<A>* partials;  // (segments, B)
};

// grid (B, segments): one block reduces kSegment classes of one row. The batch is on x
// (up to 2^31 - 1 blocks): y allows only 65535, which would cap the batch size.
template <typename A, int64_t KIND>
__global__ void __launch_bounds__(kThreads) forward_segment_kernel(ForwardKernelArgs<A> a, MarginParams mp) {
  const int64_t b = blockIdx.x;
  const int64_t n = a.num_classes;
  const A* row = a.tile + b * n * a.k;
  const A r = a.row_scale[b];
  const int64_t target = a.labels[b] - a.first_class;  // in [0, n) iff the target is in this chunk
  const bool ignored = a.labels[b] <= kIgnoredLabel;  // not part of the computation: an empty partial
  const auto tr = row_transform<KIND>(mp, a.row_threshold, a.num_rows, b);
  const A scale = A(mp.scale);

  A z[kItems];
  Partial<A> p{neg_inf<A>(), A(0), A(0), neg_inf<A>(), INT64_MAX};
  bool has_nan = false;
  const int64_t base = int64_t(blockIdx.y) * kSegment + threadIdx.x;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t j = base + int64_t(i) * kThreads;  // coalesced across the warp
    z[i] = neg_inf<A>();
    if (j < n && !ignored) {
      int64_t sub;
      const A u = a.k == 1 ? row[j] * (r * a.col_scale[j]) : subcenter_max(row, a.col_scale, r, j, a.k, &sub);
      const A bj = a.bias != nullptr ? a.bias[j] : A(0);
      const A plain = scale * u + bj;  // margin-free logit: training accuracy
      if (plain > p.best) {  // j increases per thread: strict keeps the lowest
        p.best = plain;
        p.best_index = j;
      }
      if (j == target) {
        a.target_u[b] = u;
      } else {
        z[i] = scale * tr.value(u) + bj;
        p.sum += z[i];
        p.max = fmax(p.max, z[i]);
        has_nan = has_nan || z[i] != z[i];
      }
    }
  }
  if (p.max > neg_inf<A>()) {
#pragma unroll
    for (int i = 0; i < kItems; ++i) p.sumexp += exp(z[i] - p.max);  // exp(-inf) = 0
  }
  // fmax skips NaN: a NaN negative is carried in the sum of exponentials instead, so
  // that lse_neg is NaN (as in torch), never the -inf of a row without negatives.
  if (has_nan) p.sumexp = A(NAN);

  // warp tree, then the warps' results in order
  for (int offset = 16; offset > 0; offset >>= 1) p = combine(p, shuffle_down(p, offset));
  __shared__ Partial<A> warp_partials[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_partials[warp] = p;
  __syncthreads();
  if (threadIdx.x == 0) {
    Partial<A> total = warp_partials[0];
    for (int w = 1; w < kWarps; ++w) total = combine(total, warp_partials[w]);
    a.partials[int64_t(blockIdx.y) * a.num_rows + b] = total;
  }
}

// One thread per row: merges the chunk's segments, in order, into the running state.
template <typename A>
__global__ void merge_segments_kernel(const Partial<A>* partials, int64_t segments, int64_t num_rows,
                                      int64_t first_class, RowStates st) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= num_rows) return;
  double mx = st.max[b], se = st.sumexp[b], sum = st.sum[b], best = st.best[b];
  int64_t best_index = st.best_index[b];
  for (int64_t s = 0; s < segments; ++s) {
    const Partial<A> p = partials[s * num_rows + b];
    lse_merge(mx, se, double(p.max), double(p.sumexp));
    sum += double(p.sum);
    if (double(p.best) > best) {  // segments and chunks arrive in class order
      best = double(p.best);
      best_index = first_class + p.best_index;
    }
  }
  st.max[b] = mx;
  st.sumexp[b] = se;
  st.sum[b] = sum;
  st.best[b] = best;
  st.best_index[b] = best_index;
}

__global__ void init_states_kernel(RowStates st, int64_t num_rows) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= num_rows) return;
  st.max[b] = -double(INFINITY);
  st.sumexp[b] = 0.0;
  st.sum[b] = 0.0;
  st.best[b] = -double(INFINITY);
  st.best_index[b] = -1;
}

template <typename A>
__global__ void finalize_kernel(RowStates st, int64_t num_rows, A* lse_neg, A* sum_neg, int64_t* argmax) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= num_rows) return;
  // No negative class (C = 1 with a target, an ignored row): lse_neg = -inf. A NaN or
  // +inf logit gives a NaN sum of exponentials: NaN, never the -inf of an empty row.
  const bool has_terms = st.sumexp[b] > 0.0 || isnan(st.sumexp[b]);
  lse_neg[b] = has_terms ? A(st.max[b] + log(st.sumexp[b])) : neg_inf<A>();
  sum_neg[b] = A(st.sum[b]);
  argmax[b] = st.best_index[b] < 0 ? 0 : st.best_index[b];
}

// ---- backward ---------------------------------------------------------------------

template <typename A, typename G>
struct BackwardKernelArgs : TypedChunk<A> {
  G* grad_tile;  // may alias tile (G == A)
  const A* grad_lse;
  const A* grad_target_u;
  const A* grad_sum;
  const A* lse_neg;
  A* bias_partials;  // (row blocks, n) or nullptr
};

// grid (ceil(n / kThreads), row blocks): thread = one class j, looping over the block's
// rows (coalesced: a warp reads 32 neighbouring columns of one row). No reduction but
// the per-column dz sum of the bias gradient.
template <typename A, typename G, int64_t KIND>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardKernelArgs<A, G> a, MarginParams mp) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t n = a.num_classes, k = a.k;
  if (j >= n) return;
  const int64_t b_begin = int64_t(blockIdx.y) * kRowsPerBlock;
  const int64_t b_end = b_begin + kRowsPerBlock < a.num_rows ? b_begin + kRowsPerBlock : a.num_rows;
  const A bj = a.bias != nullptr ? a.bias[j] : A(0);
  const A scale = A(mp.scale);
  A dbias = A(0);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const A* row = a.tile + b * n * k;
    G* grad_row = a.grad_tile + b * n * k;
    const A r = a.row_scale[b];
    A lse = a.lse_neg[b];
    A grad_lse = a.grad_lse[b];
    if (lse == neg_inf<A>()) {  // no negative class in this row: no softmax term (NaN propagates)
      lse = A(0);
      grad_lse = A(0);
    }
    if (a.labels[b] <= kIgnoredLabel) {  // not part of the computation: G = 0, whatever the logits hold
      for (int64_t s = 0; s < k; ++s) grad_row[j * k + s] = store_as<G>(A(0));
      continue;
    }
    const auto tr = row_transform<KIND>(mp, a.row_threshold, a.num_rows, b);
    const bool is_target = j == a.labels[b] - a.first_class;
    int64_t best = 0;
    const A u = k == 1 ? row[j] * (r * a.col_scale[j]) : subcenter_max(row, a.col_scale, r, j, k, &best);
    const A zj = scale * tr.value(u) + bj;
    const A dz = is_target ? A(0) : grad_lse * exp(zj - lse) + a.grad_sum[b];
    dbias += dz;
    const A du = dz * (scale * tr.derivative(u)) + (is_target ? a.grad_target_u[b] : A(0));
    // Route the class's gradient to the sub-center that attained the max. All K reads
    // above precede these writes (in-place when G aliases the tile).
    for (int64_t s = 0; s < k; ++s) {
      grad_row[j * k + s] = store_as<G>(s == best ? du * (r * a.col_scale[j * k + s]) : A(0));
    }
  }
  if (a.bias_partials != nullptr) a.bias_partials[int64_t(blockIdx.y) * n + j] = dbias;
}

template <typename A>
__global__ void sum_bias_partials_kernel(const A* partials, int64_t blocks, int64_t n, A* grad_bias) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= n) return;
  A total = grad_bias[j];
  for (int64_t i = 0; i < blocks; ++i) total += partials[i * n + j];  // in row order
  grad_bias[j] = total;
}

// ---- the transform alone (tests) ---------------------------------------------------

template <typename A, int64_t KIND>
__global__ void non_target_kernel(const A* u, const A* row_threshold, int64_t rows, int64_t cols, MarginParams mp,
                                  A* value, A* derivative) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * cols) return;
  const auto tr = row_transform<KIND>(mp, row_threshold, rows, i / cols);
  value[i] = tr.value(u[i]);
  derivative[i] = tr.derivative(u[i]);
}

// ---- row helpers ------------------------------------------------------------------

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One warp per row.
template <typename A, typename T>
__global__ void inverse_row_norms_kernel(const T* rows, int64_t n, int64_t dim, A* inv_norm) {
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= n) return;
  const int lane = threadIdx.x % 32;
  A ss = A(0);
  for (int64_t d = lane; d < dim; d += 32) {
    const A v = load<A>(rows, i * dim + d);
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (lane == 0) inv_norm[i] = A(1) / fmax(sqrt(ss), A(kNormEps));
}

template <typename A, typename V, typename O>
__global__ void project_rows_kernel(const A* g, const V* v, const A* inv_norm, int64_t n, int64_t dim, O* out,
                                    const int64_t* dst_rows, int64_t first_out_row) {
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= n) return;
  const int lane = threadIdx.x % 32;
  const A* gi = g + i * dim;
  A coef = A(0);
  if (inv_norm != nullptr) {
    A dot = A(0);
    for (int64_t d = lane; d < dim; d += 32) dot += gi[d] * load<A>(v, i * dim + d);
    dot = warp_sum(dot);
    coef = dot * inv_norm[i] * inv_norm[i];
  }
  const int64_t dst = dst_rows != nullptr ? dst_rows[i] : first_out_row + i;
  for (int64_t d = lane; d < dim; d += 32) {
    out[dst * dim + d] = store_as<O>(gi[d] - coef * load<A>(v, i * dim + d));
  }
}

// The coefficient of the tangent projection of row i's gradient (0 without one): the
// warp's dot product, the same arithmetic in check_rows_kernel and update_rows_kernel, so
// that the check sees exactly the gradient that the update applies.
template <typename A, typename V>
__device__ A projection_coef(const UpdateRowsArgs& a, int64_t i, int lane) {
  const A* inv_norm = static_cast<const A*>(a.inv_norm);
  if (inv_norm == nullptr) return A(0);
  const A* gi = static_cast<const A*>(a.grad) + i * a.dim;
  const V* vi = static_cast<const V*>(a.rows) + i * a.dim;
  A dot = A(0);
  for (int64_t d = lane; d < a.dim; d += 32) dot += gi[d] * load<A>(vi, d);
  dot = warp_sum(dot);
  return dot * inv_norm[i] * inv_norm[i];
}

// One warp per row: is every element of the projected gradient finite?
template <typename A, typename V>
__global__ void check_rows_kernel(UpdateRowsArgs a) {
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= a.n) return;
  const int lane = threadIdx.x % 32;
  const A coef = projection_coef<A, V>(a, i, lane);
  const A* gi = static_cast<const A*>(a.grad) + i * a.dim;
  const V* vi = static_cast<const V*>(a.rows) + i * a.dim;
  bool finite = true;
  for (int64_t d = lane; d < a.dim; d += 32) {
    const A g = a.inv_norm != nullptr ? gi[d] - coef * load<A>(vi, d) : gi[d];
    finite &= isfinite(g);
  }
  if (!finite) atomicOr(a.guard + kGuardStatus, kGuardNonFiniteGradient);
}

// One warp per row: the projection's dot product, then the update of each element
// (nothing when the guard's status is set: by this chunk's check or an earlier one).
template <typename A, typename V, typename S>
__global__ void update_rows_kernel(UpdateRowsArgs a, UpdateRule<A> rule) {
  const int64_t i = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (i >= a.n) return;
  // written only by kernels that completed before this one on the stream
  if (*static_cast<volatile int32_t*>(a.guard + kGuardStatus) != 0) return;
  const int lane = threadIdx.x % 32;
  if (i == 0 && lane == 0) a.guard[kGuardWritten] = 1;
  const int64_t dim = a.dim;
  const A* gi = static_cast<const A*>(a.grad) + i * dim;
  const V* vi = static_cast<const V*>(a.rows) + i * dim;
  const A* inv_norm = static_cast<const A*>(a.inv_norm);
  const A coef = projection_coef<A, V>(a, i, lane);
  const int64_t r = a.dst_rows != nullptr ? a.dst_rows[i] : a.first_row + i;
  S* w = static_cast<S*>(a.weight) + r * a.weight_stride[0];
  S* m = a.state[0] != nullptr ? static_cast<S*>(a.state[0]) + r * a.state_stride[0][0] : nullptr;
  S* v = a.state[1] != nullptr ? static_cast<S*>(a.state[1]) + r * a.state_stride[1][0] : nullptr;
  const int64_t ws = a.weight_stride[1], ms = a.state_stride[0][1], vs = a.state_stride[1][1];
  for (int64_t d = lane; d < dim; d += 32) {
    const A g = inv_norm != nullptr ? gi[d] - coef * load<A>(vi, d) : gi[d];
    A wv = load<A>(w, d * ws);
    A mv = m != nullptr ? load<A>(m, d * ms) : A(0);
    A vv = v != nullptr ? load<A>(v, d * vs) : A(0);
    rule.apply(wv, g, mv, vv);
    w[d * ws] = store_as<S>(wv);
    if (m != nullptr) m[d * ms] = store_as<S>(mv);
    if (v != nullptr) v[d * vs] = store_as<S>(vv);
  }
}

// ---- dtype / kind dispatch ----------------------------------------------------------

template <typename F>
void dispatch_acc(DType acc, F&& f) {
  if (acc == DType::kFloat64) {
    f(double{});
  } else if (acc == DType::kFloat32) {
    f(float{});
  } else {
    throw std::invalid_argument("fused_margin cuda backend: the accumulation type must be float32 or float64");
  }
}

template <typename F>
void dispatch_storage(DType t, F&& f) {
  switch (t) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  throw std::invalid_argument("fused_margin cuda backend: unknown storage type");
}

unsigned blocks_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

}  // namespace

int64_t forward_segments(int64_t num_classes) { return (num_classes + kSegment - 1) / kSegment; }

int64_t backward_row_blocks(int64_t num_rows) { return (num_rows + kRowsPerBlock - 1) / kRowsPerBlock; }

void init_row_states(RowStates states, int64_t num_rows, cudaStream_t stream) {
  if (num_rows == 0) return;
  init_states_kernel<<<blocks_for(num_rows, kThreads), kThreads, 0, stream>>>(states, num_rows);
  check_launch("init_row_states");
}

void forward_chunk(const ChunkArgs& c, const MarginParams& p, DType acc, RowStates states, void* target_u,
                   void* segment_buffer, cudaStream_t stream) {
  if (c.num_rows == 0) return;
  const int64_t segments = forward_segments(c.num_classes);
  dispatch_acc(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    ForwardKernelArgs<A> a{typed_chunk<A>(c), static_cast<A*>(target_u), static_cast<Partial<A>*>(segment_buffer)};
    const dim3 grid(static_cast<unsigned>(c.num_rows), static_cast<unsigned>(segments));
    dispatch_kind(p.kind, [&](auto kind_tag) {
      forward_segment_kernel<A, decltype(kind_tag)::value><<<grid, kThreads, 0, stream>>>(a, p);
    });
    check_launch("forward_segment_kernel");
    merge_segments_kernel<A><<<blocks_for(c.num_rows, kThreads), kThreads, 0, stream>>>(
        a.partials, segments, c.num_rows, c.first_class, states);
    check_launch("merge_segments_kernel");
  });
}

void finalize_rows(RowStates states, int64_t num_rows, DType acc, void* lse_neg, void* sum_neg, int64_t* argmax,
                   cudaStream_t stream) {
  if (num_rows == 0) return;
  dispatch_acc(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    finalize_kernel<A><<<blocks_for(num_rows, kThreads), kThreads, 0, stream>>>(
        states, num_rows, static_cast<A*>(lse_neg), static_cast<A*>(sum_neg), argmax);
  });
  check_launch("finalize_kernel");
}

void backward_chunk(const ChunkArgs& c, const RowGradArgs& grads, const MarginParams& p, DType acc, void* grad_tile,
                    DType grad_type, void* grad_bias, void* bias_partials, cudaStream_t stream) {
  if (c.num_rows == 0) return;
  const int64_t row_blocks = backward_row_blocks(c.num_rows);
  dispatch_acc(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    dispatch_storage(grad_type, [&](auto grad_tag) {
      using G = decltype(grad_tag);
      BackwardKernelArgs<A, G> a{typed_chunk<A>(c),
                                 static_cast<G*>(grad_tile),
                                 static_cast<const A*>(grads.grad_lse),
                                 static_cast<const A*>(grads.grad_target_u),
                                 static_cast<const A*>(grads.grad_sum),
                                 static_cast<const A*>(grads.lse_neg),
                                 grad_bias != nullptr ? static_cast<A*>(bias_partials) : nullptr};
      const dim3 grid(blocks_for(c.num_classes, kThreads), static_cast<unsigned>(row_blocks));
      dispatch_kind(p.kind, [&](auto kind_tag) {
        backward_kernel<A, G, decltype(kind_tag)::value><<<grid, kThreads, 0, stream>>>(a, p);
      });
      check_launch("backward_kernel");
    });
    if (grad_bias != nullptr) {
      sum_bias_partials_kernel<A><<<blocks_for(c.num_classes, kThreads), kThreads, 0, stream>>>(
          static_cast<const A*>(bias_partials), row_blocks, c.num_classes, static_cast<A*>(grad_bias));
      check_launch("sum_bias_partials_kernel");
    }
  });
}

void non_target_values(const void* u, const void* row_threshold, int64_t rows, int64_t cols, const MarginParams& p,
                       DType acc, void* value, void* derivative, cudaStream_t stream) {
  if (rows * cols == 0) return;
  dispatch_acc(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    dispatch_kind(p.kind, [&](auto kind_tag) {
      non_target_kernel<A, decltype(kind_tag)::value><<<blocks_for(rows * cols, kThreads), kThreads, 0, stream>>>(
          static_cast<const A*>(u), static_cast<const A*>(row_threshold), rows, cols, p, static_cast<A*>(value),
          static_cast<A*>(derivative));
    });
  });
  check_launch("non_target_kernel");
}

void inverse_row_norms(const void* rows, DType row_type, int64_t n, int64_t dim, void* inv_norm, DType acc,
                       cudaStream_t stream) {
  if (n == 0) return;
  dispatch_acc(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    dispatch_storage(row_type, [&](auto row_tag) {
      using T = decltype(row_tag);
      inverse_row_norms_kernel<A, T><<<blocks_for(n, kWarps), kThreads, 0, stream>>>(
          static_cast<const T*>(rows), n, dim, static_cast<A*>(inv_norm));
    });
  });
  check_launch("inverse_row_norms_kernel");
}

void project_rows(const void* g, const void* v, DType v_type, const void* inv_norm, int64_t n, int64_t dim,
                  void* out, DType out_type, const int64_t* dst_rows, int64_t first_out_row, DType acc,
                  cudaStream_t stream) {
  if (n == 0) return;
  dispatch_acc(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    dispatch_storage(v_type, [&](auto v_tag) {
      using V = decltype(v_tag);
      dispatch_storage(out_type, [&](auto out_tag) {
        using O = decltype(out_tag);
        project_rows_kernel<A, V, O><<<blocks_for(n, kWarps), kThreads, 0, stream>>>(
            static_cast<const A*>(g), static_cast<const V*>(v), static_cast<const A*>(inv_norm), n, dim,
            static_cast<O*>(out), dst_rows, first_out_row);
      });
    });
  });
  check_launch("project_rows_kernel");
}

void check_rows(const UpdateRowsArgs& args, DType acc, cudaStream_t stream) {
  if (args.n == 0 || args.dim == 0) return;
  dispatch_acc(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    dispatch_storage(args.rows_type, [&](auto rows_tag) {
      using V = decltype(rows_tag);
      check_rows_kernel<A, V><<<blocks_for(args.n, kWarps), kThreads, 0, stream>>>(args);
    });
  });
  check_launch("check_rows_kernel");
}

void update_rows(const UpdateRowsArgs& args, const UpdateScalars& update, DType acc, cudaStream_t stream) {
  if (args.n == 0 || args.dim == 0) return;
  dispatch_acc(acc, [&](auto acc_tag) {
    using A = decltype(acc_tag);
    const UpdateRule<A> rule = UpdateRule<A>::make(update);
    dispatch_storage(args.rows_type, [&](auto rows_tag) {
      using V = decltype(rows_tag);
      dispatch_storage(args.storage, [&](auto storage_tag) {
        using S = decltype(storage_tag);
        update_rows_kernel<A, V, S><<<blocks_for(args.n, kWarps), kThreads, 0, stream>>>(args, rule);
      });
    });
  });
  check_launch("update_rows_kernel");
}

}  // namespace cuda
}  // namespace fused_margin
