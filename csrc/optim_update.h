// One optimizer step on one element of the class weights: the rule the fused backward
// applies to each weight row as soon as the row's gradient is formed, shared by the CPU
// code and the CUDA kernels (so the CPU tests run the very code the GPU runs).
//
// No torch headers here: the .cu files include this too. The rule is the one of
// fused_margin/optim/update.py (WeightUpdate, apply_update_), as torch.optim computes it
// with foreach=False; the scalars arrive in the order of WeightUpdate.scalars().
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace fused_margin {

// Must match fused_margin.optim.update.UPDATE_SGD / UPDATE_ADAM.
enum UpdateKind : int64_t { kUpdateSgd = 1, kUpdateAdam = 2 };

// The guard of a fused update (fused_margin/optim/update.py): an int32 pair on the
// weight's device. guard[kGuardStatus] is 0 while every gradient met was finite; a chunk
// whose gradient is not is not applied and sets kGuardNonFiniteGradient, and nothing is
// written once the status is non-zero (the caller may set kGuardNonFiniteInputs before
// the call). guard[kGuardWritten] becomes 1 with the first weight row written.
constexpr int64_t kGuardSize = 2;
constexpr int64_t kGuardStatus = 0;
constexpr int64_t kGuardWritten = 1;
constexpr int32_t kGuardNonFiniteGradient = 1;
constexpr int32_t kGuardNonFiniteInputs = 2;

// The number of scalars of WeightUpdate.scalars().
constexpr int64_t kUpdateScalarCount = 14;

// The update's host scalars, in the order of WeightUpdate.scalars().
struct UpdateScalars {
  int64_t kind;
  double lr;
  double weight_decay;
  bool maximize;
  // SGD
  double momentum;
  double dampening;
  bool nesterov;
  bool first_step;
  // Adam / AdamW
  double beta1;
  double beta2;
  double eps;
  bool decoupled;
  double bias_correction1;
  double bias_correction2_sqrt;

  // From the flat list of WeightUpdate.scalars() (kUpdateScalarCount values).
  static UpdateScalars from_list(const double* s) {
    return UpdateScalars{static_cast<int64_t>(s[0]), s[1], s[2], s[3] != 0.0, s[4], s[5], s[6] != 0.0,
                         s[7] != 0.0, s[8], s[9], s[10], s[11] != 0.0, s[12], s[13]};
  }

  // How many state tensors the update reads and writes: (momentum_buffer,) for SGD with
  // momentum, none for plain SGD, (exp_avg, exp_avg_sq) for Adam.
  int64_t num_state() const { return kind == kUpdateAdam ? 2 : (momentum != 0.0 ? 1 : 0); }
};

// The rule in the accumulation type A (float or double). Every constant that the Python
// definition computes on host floats (1 - dampening, lr / bias_correction1, ...) is
// computed here in double and rounded once to A, as a PyTorch scalar operand is.
template <typename A>
struct UpdateRule {
  int64_t kind;
  bool maximize, has_weight_decay, has_momentum, nesterov, first_step, decoupled;
  A lr, weight_decay, momentum, one_minus_dampening;
  A one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, decay_factor;

  FM_HOST_DEVICE static UpdateRule make(const UpdateScalars& s) {
    UpdateRule r;
    r.kind = s.kind;
    r.maximize = s.maximize;
    r.has_weight_decay = s.weight_decay != 0.0;
    r.has_momentum = s.momentum != 0.0;
    r.nesterov = s.nesterov;
    r.first_step = s.first_step;
    r.decoupled = s.decoupled;
    r.lr = A(s.lr);
    r.weight_decay = A(s.weight_decay);
    r.momentum = A(s.momentum);
    r.one_minus_dampening = A(1.0 - s.dampening);
    r.one_minus_beta1 = A(1.0 - s.beta1);
    r.beta2 = A(s.beta2);
    r.one_minus_beta2 = A(1.0 - s.beta2);
    r.eps = A(s.eps);
    r.step_size = A(s.lr / s.bias_correction1);
    r.bias_correction2_sqrt = A(s.bias_correction2_sqrt);
    r.decay_factor = A(1.0 - s.lr * s.weight_decay);
    return r;
  }

  // One element: the weight w, its gradient g, and its state (s0: momentum_buffer or
  // exp_avg; s1: exp_avg_sq), all in A; updates w, s0 and s1 (the state that the kind
  // does not use is left as it is).
  FM_HOST_DEVICE void apply(A& w, A g, A& s0, A& s1) const {
    if (maximize) g = -g;
    if (kind == kUpdateSgd) {
      if (has_weight_decay) g = g + weight_decay * w;
      if (has_momentum) {
        const A buf = first_step ? g : momentum * s0 + one_minus_dampening * g;
        s0 = buf;
        g = nesterov ? g + momentum * buf : buf;
      }
      w = w - lr * g;
    } else {  // kUpdateAdam
      if (has_weight_decay) {
        if (decoupled) {
          w = w * decay_factor;
        } else {
          g = g + weight_decay * w;
        }
      }
      const A m = s0 + one_minus_beta1 * (g - s0);
      const A v = beta2 * s1 + one_minus_beta2 * g * g;
      s0 = m;
      s1 = v;
      const A denom = sqrt_of(v) / bias_correction2_sqrt + eps;
      w = w - step_size * m / denom;
    }
  }

 private:
  FM_HOST_DEVICE static float sqrt_of(float v) { return sqrtf(v); }
  FM_HOST_DEVICE static double sqrt_of(double v) { return sqrt(v); }
};

}  // namespace fused_margin
