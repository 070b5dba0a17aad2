// The per-element math of the fused operation that the CPU and CUDA kernels share: the
// non-target transform T(u) and its derivative T'(u) for every NonTargetKind, the kind
// dispatch, the sub-center max, and the online log-sum-exp merge.
//
// One definition for both: csrc/cpu/epilogue.cpp (host code, also on GCC vector lanes)
// and csrc/cuda/epilogue.cu (device code) include this header, so the CPU tests run the
// very code the CUDA kernels run. The Python definition it must match is
// fused_margin.spec.NonTarget (value / derivative); tests/test_non_target.py checks every
// backend against it. No torch headers (nvcc compiles the .cu files without them).
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "margin_params.h"

#include "host_device.h"

namespace fused_margin {

// c ? a : b. For scalars (c a bool) and for GCC vector-extension lanes (c a lane mask, as
// `v > w` gives): a blend, no branch, so the CPU loops vectorize.
template <typename M, typename X>
FM_HOST_DEVICE FM_FORCE_INLINE X select(M c, X a, X b) {
  return c ? a : b;
}

// T(u) and T'(u) of kind KIND (margin_params.h). T is a float or double; X is T or a
// vector of T lanes (the CPU epilogue), with the constants broadcast. The derivative is
// the one the backward uses (fused_margin.spec.NonTarget.derivative): CurricularFace's t
// and threshold and the Circle weight [u + m]_+ are constants. Every comparison is written
// so that a NaN cosine gives a NaN value (never a silent 0 or u).
template <int64_t KIND, typename T>
struct NonTargetTransform {
  T alpha, delta, margin;  // MarginParams' constants (FILTERED's threshold travels as margin)
  T threshold, t;          // CurricularFace's constants of the row (row_threshold), else 0

  template <typename X>
  FM_HOST_DEVICE FM_FORCE_INLINE X value(X u) const {
    if constexpr (KIND == kIdentity) {
      return u;
    } else if constexpr (KIND == kAffine) {
      return alpha * u + delta;
    } else if constexpr (KIND == kQuadratic || KIND == kQuadraticDetached) {
      const X shifted = u + margin;
      return select(shifted > T(0), shifted, X{}) * (u - margin);  // 0 * NaN: NaN
    } else if constexpr (KIND == kFiltered) {
      return select(u > margin, X{}, u);  // u > t: a NaN cosine stays NaN
    } else {
      static_assert(KIND == kCurricular, "unknown non-target kind");
      return select(u > threshold, u * (t + u), u);
    }
  }

  template <typename X>
  FM_HOST_DEVICE FM_FORCE_INLINE X derivative(X u) const {
    const X zero{};
    if constexpr (KIND == kIdentity) {
      return zero + T(1);
    } else if constexpr (KIND == kAffine) {
      return zero + alpha;
    } else if constexpr (KIND == kQuadratic) {
      return select(u > -margin, T(2) * u, zero);
    } else if constexpr (KIND == kQuadraticDetached) {
      const X shifted = u + margin;
      return select(shifted > T(0), shifted, zero);
    } else if constexpr (KIND == kFiltered) {
      return select(u > margin, zero, zero + T(1));
    } else {
      static_assert(KIND == kCurricular, "unknown non-target kind");
      return select(u > threshold, t + T(2) * u, zero + T(1));
    }
  }
};

// The transform of one row: `row_threshold` is (2, num_rows), CurricularFace's thresholds
// then t (nullptr for the other kinds).
template <int64_t KIND, typename T>
FM_HOST_DEVICE FM_FORCE_INLINE NonTargetTransform<KIND, T> row_transform(const MarginParams& p,
                                                                         const T* row_threshold,
                                                                         int64_t num_rows, int64_t b) {
  const bool has = row_threshold != nullptr;
  return NonTargetTransform<KIND, T>{T(p.alpha), T(p.delta), T(p.margin), has ? row_threshold[b] : T(0),
                                     has ? row_threshold[num_rows + b] : T(0)};
}

// f(std::integral_constant<int64_t, KIND>{}) for the kind `kind` (host code; the kernels
// take the kind as a template argument). The op's input checks accept only these kinds.
template <typename F>
FM_FORCE_INLINE void dispatch_kind(int64_t kind, F&& f) {
  switch (kind) {
    case kIdentity: return f(std::integral_constant<int64_t, kIdentity>{});
    case kAffine: return f(std::integral_constant<int64_t, kAffine>{});
    case kQuadratic: return f(std::integral_constant<int64_t, kQuadratic>{});
    case kQuadraticDetached: return f(std::integral_constant<int64_t, kQuadraticDetached>{});
    case kCurricular: return f(std::integral_constant<int64_t, kCurricular>{});
    case kFiltered: return f(std::integral_constant<int64_t, kFiltered>{});
  }
  throw std::invalid_argument("fused_margin: unknown non-target kind " + std::to_string(kind));
}

// u_j = max_k r q_{jK+k} dot_{jK+k} over the K sub-centers of class j of a tile row
// (`row`: the dot products, `q`: the column scales); `best` gets the sub-center attaining
// it, the lowest on ties. A NaN sub-center makes the class NaN, as torch.amax does.
template <typename T, typename I>
FM_HOST_DEVICE FM_FORCE_INLINE T subcenter_max(const T* row, const T* q, T r, int64_t j, int64_t k, I* best) {
  T top = row[j * k] * (r * q[j * k]);
  I arg = 0;
  for (int64_t s = 1; s < k; ++s) {
    const T v = row[j * k + s] * (r * q[j * k + s]);
    const bool gt = v > top || v != v;  // strict: the lowest sub-center on ties
    top = select(gt, v, top);
    arg = select(gt, static_cast<I>(s), arg);
  }
  *best = arg;
  return top;
}

template <typename S>
FM_HOST_DEVICE FM_FORCE_INLINE S exp_of(S x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// The online log-sum-exp merge: folds a part (its max and its sum of exp(z - max)) into
// the running (max, sumexp), in place. A part with max -inf and sumexp 0 (no term) leaves
// the state unchanged; a NaN sumexp (a NaN term: a max skips NaN) makes the state's NaN,
// so that the log-sum-exp is NaN, never the -inf of a row without terms.
template <typename S>
FM_HOST_DEVICE FM_FORCE_INLINE void lse_merge(S& max, S& sumexp, S part_max, S part_sumexp) {
  if (part_max > max) {
    sumexp = sumexp * exp_of(max - part_max) + part_sumexp;
    max = part_max;
  } else if (part_max > -S(INFINITY) || part_sumexp != part_sumexp) {
    sumexp += part_sumexp * exp_of(part_max - max);
  }
}

}  // namespace fused_margin
