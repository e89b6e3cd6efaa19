// The SGD update of one element (or one SIMD vector of elements), written once.
//
// This is torch.optim.SGD's rule (torch 2.13, _single_tensor_sgd), with the arithmetic done in the
// accumulation type (float for fp32/bf16/fp16 params, double for fp64):
//
//   d = maximize ? -grad : grad            (grad already unscaled by the GradScaler, if any)
//   d = d + weight_decay * param           (only when weight_decay != 0, so inf params stay inf)
//   if momentum buffers are in use:
//     buf = first_step ? d : (momentum * buf) + (1 - dampening) * d
//     d   = nesterov ? d + momentum * buf : buf
//   param = param - lr * d
//
// Each `x + a * y` is one fused multiply-add, exactly as torch's `x.add_(y, alpha=a)`; `momentum * buf`
// is rounded first, as torch's `buf.mul_(momentum)`.
//
// `Value` is either a scalar (float/double) or an at::vec::Vectorized of it: the same text serves the
// scalar tails, the SIMD loops and (later) CUDA. All flags are uniform per call, so the branches are
// perfectly predicted and cost nothing per element.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define TORCHSGD8_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TORCHSGD8_HOST_DEVICE inline
#endif

namespace torchsgd8 {

// a * b + c with one rounding, as ATen's `x.add_(y, alpha=a)` computes it (vec::fmadd), so our results
// match torch.optim.SGD's to the last bit wherever the operation order is the same. The Vectorized
// overload is at::vec::fmadd, found by argument-dependent lookup.
TORCHSGD8_HOST_DEVICE float fmadd(float a, float b, float c) {
  return std::fma(a, b, c);
}
TORCHSGD8_HOST_DEVICE double fmadd(double a, double b, double c) {
  return std::fma(a, b, c);
}

template <typename acc_t>
struct SgdHyper {
  acc_t lr;
  acc_t momentum;
  acc_t dampening_complement;  // 1 - dampening, computed once in acc_t as torch does (alpha=1-dampening)
  acc_t weight_decay;
  acc_t grad_scale;  // divide grads by this when unscale is set (GradScaler)
  bool unscale;
  bool use_momentum;  // false: no buffer at all (momentum == 0 at construction), like torch
  bool first_step;    // buffers were just created: buf = d, no dampening
  bool nesterov;
  bool maximize;
};

// Returns the new param; updates `buf` in place when momentum is in use (it is not read on the first step).
template <typename Value, typename acc_t>
TORCHSGD8_HOST_DEVICE Value sgd_rule(Value param, Value grad, Value& buf, const SgdHyper<acc_t>& h) {
  Value d = h.unscale ? grad / Value(h.grad_scale) : grad;
  if (h.maximize) {
    d = -d;
  }
  if (h.weight_decay != acc_t(0)) {
    d = fmadd(param, Value(h.weight_decay), d);
  }
  if (h.use_momentum) {
    buf = h.first_step ? d : fmadd(d, Value(h.dampening_complement), Value(h.momentum) * buf);
    d = h.nesterov ? fmadd(buf, Value(h.momentum), d) : buf;
  }
  return fmadd(d, Value(-h.lr), param);
}

// Hyperparameters are read once per call in double, then narrowed to the accumulation type.
template <typename acc_t>
SgdHyper<acc_t> cast_hyper(const SgdHyper<double>& h) {
  return SgdHyper<acc_t>{static_cast<acc_t>(h.lr),
                         static_cast<acc_t>(h.momentum),
                         static_cast<acc_t>(h.dampening_complement),
                         static_cast<acc_t>(h.weight_decay),
                         static_cast<acc_t>(h.grad_scale),
                         h.unscale,
                         h.use_momentum,
                         h.first_step,
                         h.nesterov,
                         h.maximize};
}

}  // namespace torchsgd8
