// Vectorizable row loops of the CPU epilogue (see epilogue.h).
//
// Reductions run in SIMD lanes (GCC vector extensions) that fold in a fixed order: the
// result depends neither on the thread count nor on the instruction set the loader
// picked. Branches are written as selects so the
// loops vectorize without -ffast-math (which would break the -inf masking); GCC turns
// those selects into blends only with -fno-trapping-math (setup.py passes it, as torch's
// own build does; it changes no value).

#include "epilogue.h"

#include <algorithm>
#include <cmath>
#include <cstring>

// One clone for AVX2 + FMA machines (x86-64-v3) and one baseline, chosen by the dynamic
// loader (ifunc) from the running CPU. (An AVX-512 clone measured no faster here: the
// epilogue is a few percent of the GEMMs; it would add to the build time.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__linux__)
#define FM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FM_MULTIVERSION
#endif

#if defined(__GNUC__)
#define FM_INLINE inline __attribute__((always_inline))
// A lambda body inlined into its caller: the kind dispatch's lambdas must land inside the
// multiversioned entry points, so that they are compiled for the clone's instruction set.
#define FM_INLINE_LAMBDA __attribute__((always_inline))
#else
#define FM_INLINE inline
#define FM_INLINE_LAMBDA
#endif

// The vector types never cross a non-inlined call: no ABI to keep stable.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "../non_target.h"

namespace fused_margin {
namespace cpu {
namespace {

// 32-byte SIMD vectors (GCC vector extensions): one AVX2 register, two SSE registers in
// the baseline clone. Wider generic vectors are lowered through the stack by GCC.
// Every clone sees the same lanes, so the same results.
template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  static constexpr int kWidth = 8;
  typedef float V __attribute__((vector_size(32)));
  typedef uint32_t Bits __attribute__((vector_size(32)));
  typedef int32_t Index __attribute__((vector_size(32)));  // also the type of V < V
};
template <>
struct Lanes<double> {
  static constexpr int kWidth = 4;
  typedef double V __attribute__((vector_size(32)));
  typedef uint64_t Bits __attribute__((vector_size(32)));
  typedef int64_t Index __attribute__((vector_size(32)));
};

// Same-width unsigned integer type of a scalar or a vector.
template <typename X>
struct BitsOf;
template <>
struct BitsOf<float> {
  using type = uint32_t;
};
template <>
struct BitsOf<double> {
  using type = uint64_t;
};
template <>
struct BitsOf<Lanes<float>::V> {
  using type = Lanes<float>::Bits;
};
template <>
struct BitsOf<Lanes<double>::V> {
  using type = Lanes<double>::Bits;
};

template <typename To, typename From>
FM_INLINE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between different sizes");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

template <typename V, typename T>
FM_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T, typename V>
FM_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// exp(x) for the softmax terms: x <= 0 in practice (z - running max, z - lse); X is a
// float or double scalar or vector. Range reduction x = n ln2 + r with |r| <= ln2/2, a
// minimax (float) or Taylor (double) polynomial for exp(r), and 2^n assembled in the
// exponent bits. Results below the smallest normal number are returned as exactly 0:
// those probabilities can never matter next to the row's largest (>= 1/C), and a
// denormal operand makes the next GEMM run ~25x slower on x86 (docs/design.md section 5) --
// this is the flush, done here instead of in the process-wide FTZ/DAZ state.
//
// ExpFlush<T>: the constants of each element type T, and its polynomial.
template <typename T>
struct ExpFlush;
template <>
struct ExpFlush<float> {
  static constexpr float kLow = -87.0f;  // e^-87 = 1.6e-38 > FLT_MIN
  static constexpr float kHigh = 88.0f;
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln2 split in two (Cephes)
  static constexpr uint32_t kExponentBias = 127u;
  static constexpr int kMantissaBits = 23;

  template <typename X>
  static FM_INLINE X exp_reduced(X r) {
    X poly = X{} + 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    return poly * (r * r) + r + 1.0f;
  }
};
template <>
struct ExpFlush<double> {
  static constexpr double kLow = -708.0;  // e^-708 = 3.3e-308 > DBL_MIN
  static constexpr double kHigh = 709.0;
  static constexpr double kLog2e = 1.4426950408889634074;
  static constexpr double kShift = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  static constexpr uint32_t kExponentBias = 1023u;
  static constexpr int kMantissaBits = 52;

  // Taylor series to degree 13: truncation error (ln2/2)^14/14! < 1e-17 on |r| <= ln2/2.
  template <typename X>
  static FM_INLINE X exp_reduced(X r) {
    X poly = X{} + 1.0 / 6227020800.0;
    poly = poly * r + 1.0 / 479001600.0;
    poly = poly * r + 1.0 / 39916800.0;
    poly = poly * r + 1.0 / 3628800.0;
    poly = poly * r + 1.0 / 362880.0;
    poly = poly * r + 1.0 / 40320.0;
    poly = poly * r + 1.0 / 5040.0;
    poly = poly * r + 1.0 / 720.0;
    poly = poly * r + 1.0 / 120.0;
    poly = poly * r + 1.0 / 24.0;
    poly = poly * r + 1.0 / 6.0;
    poly = poly * r + 0.5;
    poly = poly * r + 1.0;
    return poly * r + 1.0;
  }
};

template <typename T, typename X>
FM_INLINE X exp_flush_as(X x) {
  using C = ExpFlush<T>;
  using U = typename BitsOf<X>::type;
  const X zero{};
  const X xc = select(x < C::kLow, zero + C::kLow, select(x > C::kHigh, zero + C::kHigh, x));
  const X shifted = xc * C::kLog2e + C::kShift;
  const X n = shifted - C::kShift;
  const X r = (xc - n * C::kLn2Hi) - n * C::kLn2Lo;
  const X poly = C::exp_reduced(r);
  // 2^n: the low mantissa bits of `shifted` hold n
  const U scale_bits = (bit_cast<U>(shifted) + C::kExponentBias) << C::kMantissaBits;
  return select(x < C::kLow, zero, poly * bit_cast<X>(scale_bits));  // NaN propagates, -inf gives 0
}

FM_INLINE float exp_flush(float x) { return exp_flush_as<float>(x); }
FM_INLINE double exp_flush(double x) { return exp_flush_as<double>(x); }
FM_INLINE Lanes<float>::V exp_flush(Lanes<float>::V x) { return exp_flush_as<float>(x); }
FM_INLINE Lanes<double>::V exp_flush(Lanes<double>::V x) { return exp_flush_as<double>(x); }

template <typename T>
constexpr T smallest_normal() {
  return std::numeric_limits<T>::min();
}

// u_j = max_k r q_{jK+k} t_{jK+k} over the K sub-centers of each class of a tile row.
// K = 1 scales the row in place and returns it; K > 1 writes `u` and the argmax `best`.
template <typename T>
FM_INLINE const T* class_cosines(T* row, const T* q, T r, int64_t n, int64_t k, T* u, int32_t* best) {
  if (k == 1) {
    for (int64_t j = 0; j < n; ++j) row[j] = row[j] * (r * q[j]);
    return row;
  }
  for (int64_t j = 0; j < n; ++j) u[j] = subcenter_max(row, q, r, j, k, best + j);
  return u;
}

template <typename T, int64_t KIND>
FM_INLINE void forward_rows(const ChunkTile<T>& c, const MarginParams& p, RowState* state, T* target_u) {
  const T s = T(p.scale);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int32_t n = static_cast<int32_t>(c.num_classes);
  const int64_t k = p.num_subcenters;
  using V = typename Lanes<T>::V;
  using Index = typename Lanes<T>::Index;
  constexpr int32_t W = Lanes<T>::kWidth;
  const int32_t n_full = n / W * W;
  T* z = c.scratch;
  T* u_sub = c.scratch + n;

  for (int64_t b = 0; b < c.num_rows; ++b) {
    if (c.labels[b] <= kIgnoredLabel) continue;  // not part of the computation: the state stays empty
    const T* u = class_cosines(c.tile + b * n * k, c.col_scale, c.row_scale[b], n, k, u_sub, c.best_sub);
    const int64_t y = c.labels[b] - c.first_class;
    const int32_t target = (y >= 0 && y < n) ? static_cast<int32_t>(y) : -1;
    const auto tr = row_transform<KIND>(p, c.row_threshold, c.num_rows, b);

    // Pass 1: z_j = s T(u_j) + bias_j with its lane maxima and sums (over all classes;
    // the target is taken out below), and the lane argmax of the margin-free logit
    // s u_j + bias_j (training accuracy). Lane l owns the classes j = l (mod W).
    V pmax = V{} + neg_inf;
    Index parg{};
    Index jv;
    for (int32_t l = 0; l < W; ++l) jv[l] = l;
    V zmax = V{} + neg_inf;
    V zsum{};
    for (int32_t j0 = 0; j0 < n_full; j0 += W, jv += W) {
      const V uj = load<V>(u + j0);
      const V bj = load<V>(c.bias + j0);
      const V zj = s * tr.value(uj) + bj;
      store(z + j0, zj);
      zmax = select(zj > zmax, zj, zmax);
      zsum += zj;
      const V pj = s * uj + bj;
      const Index better = pj > pmax;  // strict: the lowest class of a lane on ties
      pmax = select(better, pj, pmax);
      parg = select(better, jv, parg);
    }
    for (int32_t j = n_full; j < n; ++j) {
      const int32_t l = j - n_full;
      const T zj = s * tr.value(u[j]) + c.bias[j];
      z[j] = zj;
      zmax[l] = select(zj > zmax[l], zj, T(zmax[l]));
      zsum[l] += zj;
      const T pj = s * u[j] + c.bias[j];
      if (pj > pmax[l]) {
        pmax[l] = pj;
        parg[l] = j;
      }
    }
    RowState& st = state[b];
    T best = pmax[0];
    int64_t best_j = parg[0];
    for (int l = 1; l < W; ++l) {
      if (pmax[l] > best || (pmax[l] == best && parg[l] < best_j)) {
        best = pmax[l];
        best_j = parg[l];
      }
    }
    if (double(best) > st.best) {  // strict: chunks arrive in class order
      st.best = double(best);
      st.best_index = c.first_class + best_j;
    }

    T m = zmax[0];
    double sum = 0.0;
    for (int l = 0; l < W; ++l) {
      m = select(zmax[l] > m, T(zmax[l]), m);
      sum += double(zsum[l]);
    }
    // The target is not a negative: out of the sum, the max and the exp-sum.
    if (target >= 0) {
      target_u[b] = u[target];
      const T zt = z[target];
      z[target] = neg_inf;
      sum -= double(zt);
      if (!(zt < m)) {  // the target held the chunk's max: take the max of the others
        m = neg_inf;
        for (int32_t j = 0; j < n; ++j) m = select(z[j] > m, z[j], m);
      }
    }
    st.sum += sum;
    if (!(m > neg_inf)) {
      // No negative of this row in the chunk compares above -inf. A NaN one (it never
      // wins a comparison) still takes part: the row's lse becomes NaN, as in torch.
      for (int32_t j = 0; j < n; ++j) {
        if (z[j] != z[j]) st.sumexp = std::numeric_limits<double>::quiet_NaN();
      }
      continue;
    }

    // Pass 3: sum exp(z - m), merged into the row's running (max, sumexp) in double.
    V e = V{};
    for (int32_t j0 = 0; j0 < n_full; j0 += W) e += exp_flush(load<V>(z + j0) - m);
    for (int32_t j = n_full; j < n; ++j) e[j - n_full] += exp_flush(z[j] - m);
    double se = 0.0;
    for (int l = 0; l < W; ++l) se += double(e[l]);
    const double md = double(m);
    lse_merge(st.max, st.sumexp, md, se);
  }
}

template <typename T, int64_t KIND>
FM_INLINE void backward_rows(const ChunkTile<T>& c, const MarginParams& p, const RowGrads<T>& g) {
  const T s = T(p.scale);
  const T tiny = smallest_normal<T>();
  const int64_t n = c.num_classes, k = p.num_subcenters;
  T* du = c.scratch;
  T* u_sub = c.scratch + n;
  T* dz_buf = c.scratch + 2 * n;

  for (int64_t b = 0; b < c.num_rows; ++b) {
    T* row = c.tile + b * n * k;
    if (c.labels[b] <= kIgnoredLabel) {  // not part of the computation: G = 0, whatever the logits hold
      std::fill(row, row + n * k, T(0));
      continue;
    }
    const T r = c.row_scale[b];
    const T* u = class_cosines(row, c.col_scale, r, n, k, u_sub, c.best_sub);
    const int64_t y = c.labels[b] - c.first_class;
    const int64_t target = (y >= 0 && y < n) ? y : -1;
    const auto tr = row_transform<KIND>(p, c.row_threshold, c.num_rows, b);
    T lse = g.lse_neg[b];
    T grad_lse = g.grad_lse[b];
    if (lse == -std::numeric_limits<T>::infinity()) {  // no negative class: no softmax term (NaN propagates)
      lse = T(0);
      grad_lse = T(0);
    }
    const T grad_sum = g.grad_sum[b];

    // Every class as a negative first: dz = grad_lse * softmax + grad_sum,
    // dU = dz * s * T'(u); G = dU * r_b * q_i is what the GEMMs consume (denormals flushed).
    // The target's entry is then overwritten (no index test in the vector loop).
    auto dz_of = [&](int64_t j) {
      const T zj = s * tr.value(u[j]) + c.bias[j];
      return grad_lse * exp_flush(zj - lse) + grad_sum;
    };
    if (k == 1) {
      for (int64_t j = 0; j < n; ++j) {
        const T dz = dz_of(j);
        dz_buf[j] = dz;
        const T gj = dz * (s * tr.derivative(u[j])) * (r * c.col_scale[j]);
        row[j] = select(std::abs(gj) < tiny, T(0), gj);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const T dz = dz_of(j);
        dz_buf[j] = dz;
        du[j] = dz * (s * tr.derivative(u[j]));
      }
    }
    if (target >= 0) {
      const T dt = g.grad_target_u[b];
      dz_buf[target] = T(0);
      if (k == 1) {
        const T gt = dt * (r * c.col_scale[target]);
        row[target] = select(std::abs(gt) < tiny, T(0), gt);
      } else {
        du[target] = dt;
      }
    }
    if (g.grad_bias != nullptr) {
      for (int64_t j = 0; j < n; ++j) g.grad_bias[j] += dz_buf[j];
    }
    if (k == 1) continue;
    // Route each class's gradient to the sub-center that attained the max.
    for (int64_t j = 0; j < n; ++j) {
      const int32_t top = c.best_sub[j];
      for (int64_t sc = 0; sc < k; ++sc) {
        const T gj = du[j] * (r * c.col_scale[j * k + sc]);
        row[j * k + sc] = select(sc == top && !(std::abs(gj) < tiny), gj, T(0));
      }
    }
  }
}

template <typename T>
FM_INLINE void forward_any(const ChunkTile<T>& c, const MarginParams& p, RowState* state, T* target_u) {
  dispatch_kind(p.kind, [&](auto kind) FM_INLINE_LAMBDA { forward_rows<T, decltype(kind)::value>(c, p, state, target_u); });
}

template <typename T>
FM_INLINE void backward_any(const ChunkTile<T>& c, const MarginParams& p, const RowGrads<T>& g) {
  dispatch_kind(p.kind, [&](auto kind) FM_INLINE_LAMBDA { backward_rows<T, decltype(kind)::value>(c, p, g); });
}

template <typename T, int64_t KIND>
FM_INLINE void non_target_rows(const T* u, const T* row_threshold, int64_t rows, int64_t cols,
                               const MarginParams& p, T* value, T* derivative) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::kWidth;
  const int64_t full = cols / W * W;
  for (int64_t b = 0; b < rows; ++b) {
    const auto tr = row_transform<KIND>(p, row_threshold, rows, b);
    const int64_t at = b * cols;
    for (int64_t j = 0; j < full; j += W) {
      const V uj = load<V>(u + at + j);
      store(value + at + j, tr.value(uj));
      store(derivative + at + j, tr.derivative(uj));
    }
    for (int64_t j = full; j < cols; ++j) {
      value[at + j] = tr.value(u[at + j]);
      derivative[at + j] = tr.derivative(u[at + j]);
    }
  }
}

template <typename T>
FM_INLINE void non_target_any(const T* u, const T* row_threshold, int64_t rows, int64_t cols,
                              const MarginParams& p, T* value, T* derivative) {
  dispatch_kind(p.kind, [&](auto kind) FM_INLINE_LAMBDA {
    non_target_rows<T, decltype(kind)::value>(u, row_threshold, rows, cols, p, value, derivative);
  });
}

// Sums of squares / dot products over a row: two vector accumulators in T, folded in
// double in a fixed order. O(rows x D), next to the O(B x rows x D) GEMMs.
template <typename T>
FM_INLINE double dot_lanes(const T* a, const T* b, int64_t dim) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::kWidth;
  V acc0{}, acc1{};
  const int64_t full = dim / (2 * W) * (2 * W);
  for (int64_t d0 = 0; d0 < full; d0 += 2 * W) {
    acc0 += load<V>(a + d0) * load<V>(b + d0);
    acc1 += load<V>(a + d0 + W) * load<V>(b + d0 + W);
  }
  double total = 0.0;
  for (int64_t l = 0; l < W; ++l) total += double(acc0[l]) + double(acc1[l]);
  for (int64_t d = full; d < dim; ++d) total += double(a[d]) * double(b[d]);
  return total;
}

template <typename T>
FM_INLINE void inv_row_norms_impl(const T* rows, int64_t n, int64_t dim, T* out) {
  for (int64_t i = 0; i < n; ++i) {
    const T* v = rows + i * dim;
    out[i] = T(1.0 / std::max(std::sqrt(dot_lanes(v, v, dim)), kNormEps));
  }
}

template <typename T>
FM_INLINE void remove_radial_impl(T* grads, const T* rows, const T* inv_norm, int64_t n, int64_t dim) {
  for (int64_t i = 0; i < n; ++i) {
    T* gi = grads + i * dim;
    const T* vi = rows + i * dim;
    const double s = double(inv_norm[i]);
    const T coef = T(dot_lanes(gi, vi, dim) * s * s);
    for (int64_t d = 0; d < dim; ++d) gi[d] -= coef * vi[d];
  }
}

}  // namespace

FM_MULTIVERSION void forward_epilogue(const ChunkTile<float>& c, const MarginParams& p, RowState* state,
                                      float* target_u) {
  forward_any(c, p, state, target_u);
}
FM_MULTIVERSION void forward_epilogue(const ChunkTile<double>& c, const MarginParams& p, RowState* state,
                                      double* target_u) {
  forward_any(c, p, state, target_u);
}
FM_MULTIVERSION void backward_epilogue(const ChunkTile<float>& c, const MarginParams& p, const RowGrads<float>& g) {
  backward_any(c, p, g);
}
FM_MULTIVERSION void backward_epilogue(const ChunkTile<double>& c, const MarginParams& p,
                                       const RowGrads<double>& g) {
  backward_any(c, p, g);
}
FM_MULTIVERSION void non_target_values(const float* u, const float* row_threshold, int64_t rows, int64_t cols,
                                       const MarginParams& p, float* value, float* derivative) {
  non_target_any(u, row_threshold, rows, cols, p, value, derivative);
}
FM_MULTIVERSION void non_target_values(const double* u, const double* row_threshold, int64_t rows, int64_t cols,
                                       const MarginParams& p, double* value, double* derivative) {
  non_target_any(u, row_threshold, rows, cols, p, value, derivative);
}
FM_MULTIVERSION void inv_row_norms(const float* rows, int64_t n, int64_t dim, float* out) {
  inv_row_norms_impl(rows, n, dim, out);
}
FM_MULTIVERSION void inv_row_norms(const double* rows, int64_t n, int64_t dim, double* out) {
  inv_row_norms_impl(rows, n, dim, out);
}
FM_MULTIVERSION void remove_radial(float* grads, const float* rows, const float* inv_norm, int64_t n, int64_t dim) {
  remove_radial_impl(grads, rows, inv_norm, n, dim);
}
FM_MULTIVERSION void remove_radial(double* grads, const double* rows, const double* inv_norm, int64_t n,
                                   int64_t dim) {
  remove_radial_impl(grads, rows, inv_norm, n, dim);
}

}  // namespace cpu
}  // namespace fused_margin
