// The fused operation's parameters as plain data, shared by the CPU and CUDA code.
// No torch headers here: the .cu files include this too (see fused_margin/kernel_params.py
// for the contract these parameters describe).
#pragma once

#include <cstdint>

namespace fused_margin {

// Must match fused_margin.spec.NonTargetKind.
enum NonTargetKind : int64_t {
  kIdentity = 0,           // T(u) = u
  kAffine = 1,             // T(u) = alpha * u + delta
  kQuadratic = 2,          // T(u) = [u + m]_+ (u - m), exact derivative
  kQuadraticDetached = 3,  // same value, derivative [u + m]_+ (Circle loss)
  kCurricular = 4,         // T(u) = u (t_b + u) if u > threshold_b else u (CurricularFace; per-row t_b)
  kFiltered = 5,           // T(u) = u [u <= margin], T'(u) = [u <= margin] (inter-class filtering)
};

struct MarginParams {
  bool normalize_x;
  bool normalize_w;
  double scale;
  int64_t kind;
  double alpha;
  double delta;
  double margin;
  int64_t num_subcenters;  // K
};

// The label of a row that is not part of the computation (fused_margin.kernel_params.IGNORED_LABEL):
// no softmax term, no gradient from its logits. -1 (no target here) still has negatives.
constexpr int64_t kIgnoredLabel = -2;

// 1/||v|| is taken as 1/max(||v||, kNormEps), as in the reference.
constexpr double kNormEps = 1e-12;

}  // namespace fused_margin
