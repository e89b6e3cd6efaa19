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
// scalar tails, the SIMD loops and (later) CUDA. All flags are uniform per call; kernels fix the common
// combinations at compile time (MomentumOptions, with_rule_options) so their loops test none of them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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

// The rule calls fused multiply-add through this point, so a vector type whose fmadd is not fused (at::vec's
// portable Vectorized computes a * b + c with two roundings) can be given a lane-wise fused one.
template <typename Value>
struct FusedMultiplyAdd {
  static TORCHSGD8_HOST_DEVICE Value apply(const Value& a, const Value& b, const Value& c) {
    return fmadd(a, b, c);
  }
};

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
  bool stochastic_rounding;  // bf16 params only: round the new param stochastically (see below)
  uint64_t rounding_seed;
};

// Which flags of SgdHyper the rule reads when it runs, and which it takes as fixed when compiled. The flag
// tests are perfectly predicted, but inside a vector loop they and the hyperparameter reloads they bring
// cost as much as the arithmetic on small cores, so the kernels instantiate their loops for the common case
// (with_rule_options): momentum after its first step, no grad unscaling, no maximize, nesterov and weight
// decay fixed as given (kFixed, MomentumOptions). Otherwise every flag is read (RuntimeOptions).
template <bool kFixed, bool kNesterov = false, bool kWeightDecay = false>
struct RuleOptions {
  template <typename H>
  static TORCHSGD8_HOST_DEVICE constexpr bool unscale(const H& h) {
    return !kFixed && h.unscale;
  }
  template <typename H>
  static TORCHSGD8_HOST_DEVICE constexpr bool maximize(const H& h) {
    return !kFixed && h.maximize;
  }
  template <typename H>
  static TORCHSGD8_HOST_DEVICE constexpr bool weight_decay(const H& h) {
    if constexpr (kFixed) {
      return kWeightDecay;
    } else {
      return h.weight_decay != decltype(h.weight_decay)(0);
    }
  }
  template <typename H>
  static TORCHSGD8_HOST_DEVICE constexpr bool use_momentum(const H& h) {
    return kFixed || h.use_momentum;
  }
  template <typename H>
  static TORCHSGD8_HOST_DEVICE constexpr bool first_step(const H& h) {
    return !kFixed && h.first_step;
  }
  template <typename H>
  static TORCHSGD8_HOST_DEVICE constexpr bool nesterov(const H& h) {
    return kFixed ? kNesterov : h.nesterov;
  }
};
using RuntimeOptions = RuleOptions</*kFixed=*/false>;
template <bool kNesterov, bool kWeightDecay>
using MomentumOptions = RuleOptions</*kFixed=*/true, kNesterov, kWeightDecay>;

// Returns the new param; updates `buf` in place when momentum is in use (it is not read on the first step).
// Options must agree with h (with_rule_options picks them).
template <typename Value, typename acc_t, typename Options = RuntimeOptions>
TORCHSGD8_HOST_DEVICE Value sgd_rule(Value param, Value grad, Value& buf, const SgdHyper<acc_t>& h, Options = {}) {
  Value d = Options::unscale(h) ? grad / Value(h.grad_scale) : grad;
  if (Options::maximize(h)) {
    d = -d;
  }
  if (Options::weight_decay(h)) {
    d = FusedMultiplyAdd<Value>::apply(param, Value(h.weight_decay), d);
  }
  if (Options::use_momentum(h)) {
    buf = Options::first_step(h) ? d
                                 : FusedMultiplyAdd<Value>::apply(d, Value(h.dampening_complement), Value(h.momentum) * buf);
    d = Options::nesterov(h) ? FusedMultiplyAdd<Value>::apply(buf, Value(h.momentum), d) : buf;
  }
  return FusedMultiplyAdd<Value>::apply(d, Value(-h.lr), param);
}

// fn(options) with the MomentumOptions matching h where one does, else fn(RuntimeOptions{}).
template <typename acc_t, typename Fn>
void with_rule_options(const SgdHyper<acc_t>& h, const Fn& fn) {
  if (!h.use_momentum || h.first_step || h.unscale || h.maximize) {
    fn(RuntimeOptions{});
    return;
  }
  const bool weight_decay = h.weight_decay != acc_t(0);
  if (h.nesterov) {
    weight_decay ? fn(MomentumOptions<true, true>{}) : fn(MomentumOptions<true, false>{});
  } else {
    weight_decay ? fn(MomentumOptions<false, true>{}) : fn(MomentumOptions<false, false>{});
  }
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
                         h.maximize,
                         h.stochastic_rounding,
                         h.rounding_seed};
}

// ---- stochastic rounding of bf16 params ----
// Small updates to a bf16 param are lost by round-to-nearest (|lr * d| below half an ulp never lands).
// Adding uniform noise below the bf16 mantissa before truncating rounds up with probability equal to
// the discarded fraction, so the expected stored value is the exact fp32 result. The noise is a
// counter-based hash of (seed, tensor, element): the same seed gives the same bits on any thread count.

TORCHSGD8_HOST_DEVICE uint32_t mix32(uint32_t x) {  // MurmurHash3's finaliser: a well-mixed bijection
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

TORCHSGD8_HOST_DEVICE uint32_t rounding_noise(uint64_t seed, uint32_t tensor, uint64_t index) {
  const uint32_t key = mix32(static_cast<uint32_t>(seed) ^
                             mix32(static_cast<uint32_t>(seed >> 32) ^
                                   mix32(tensor * 0x9e3779b9u ^ static_cast<uint32_t>(index >> 32))));
  return mix32(key ^ static_cast<uint32_t>(index));
}

// bf16 bits of v rounded up or down at random (inf/NaN are passed through by truncation, which keeps
// them inf/NaN; the noise is only added to finite values).
TORCHSGD8_HOST_DEVICE uint16_t stochastic_round_bf16_bits(float v, uint32_t noise) {
  uint32_t bits;
  static_assert(sizeof(bits) == sizeof(v));
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) {
    bits += noise & 0xffffu;
  }
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace torchsgd8
