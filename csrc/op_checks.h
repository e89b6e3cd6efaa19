// The ops' argument checks (op_contract.cpp runs them for every device). The Python optimizers validate user
// input with friendlier messages first; these checks guard direct op calls.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "quant.h"
#include "sgd_rule.h"

namespace torchsgd8 {

inline bool is_supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// Complex params (and their grads and buffers) are updated as (real, imag) pairs, as torch.optim.SGD does.
inline bool is_supported_update_dtype(at::ScalarType t) {
  return is_supported_param_dtype(t) || t == at::kComplexFloat || t == at::kComplexDouble;
}

inline std::vector<at::Tensor> as_real(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    out.push_back(t.is_complex() ? at::view_as_real(t) : t);
  }
  return out;
}

// The hyperparameter arguments of an update op, as the op received them.
struct UpdateHyper {
  const at::Tensor& lr;
  const at::Tensor& momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  bool first_step;
  const std::optional<at::Tensor>& grad_scale;
  const std::optional<at::Tensor>& found_inf;
  const std::optional<at::Tensor>& rounding_seed;
};

// Where a tensor hyperparameter (a one-element tensor) may live: on the CPU where the kernels read its
// value on the host (values_on_host); else on the CPU or on the params' device.
inline bool hyperparameter_device_fits(const at::Tensor& t, at::TensorList params, bool values_on_host) {
  return t.device().is_cpu() || (!values_on_host && (params.empty() || t.device() == params[0].device()));
}

// "CPU tensor", or where the params are not on the CPU and cpu_only is false, "tensor on the CPU or on <device>"
// (for messages).
inline std::string cpu_or_params_device(at::TensorList params, bool cpu_only) {
  return cpu_only || params.empty() || params[0].device().is_cpu()
             ? std::string("CPU tensor")
             : "tensor on the CPU or on " + params[0].device().str();
}

inline void check_hyperparameter(const at::Tensor& t, const char* name, at::TensorList params, bool values_on_host) {
  TORCH_CHECK(t.numel() == 1, "torchsgd8: ", name, " must be a 1-element tensor, got shape ", t.sizes());
  TORCH_CHECK(hyperparameter_device_fits(t, params, values_on_host), "torchsgd8: ", name, " must be a ",
              cpu_or_params_device(params, values_on_host), ", got ", t.device());
}

// lr, momentum, grad_scale, rounding_seed and found_inf, in this order: found_inf last, so a skipped step
// still validates every argument.
inline void check_hyperparameters(at::TensorList params, const UpdateHyper& h, bool values_on_host) {
  check_hyperparameter(h.lr, "lr", params, values_on_host);
  check_hyperparameter(h.momentum, "momentum", params, values_on_host);
  if (h.grad_scale.has_value()) {
    check_hyperparameter(*h.grad_scale, "grad_scale", params, values_on_host);
  }
  if (h.rounding_seed.has_value()) {
    const at::Tensor& seed = *h.rounding_seed;
    TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong &&
                    hyperparameter_device_fits(seed, params, values_on_host),
                "torchsgd8: rounding_seed must be a 1-element int64 ", cpu_or_params_device(params, values_on_host));
    TORCH_CHECK(params.empty() || params[0].scalar_type() == at::kBFloat16,
                "torchsgd8: stochastic rounding (rounding_seed) applies to bfloat16 params, got ",
                params[0].scalar_type());
  }
  if (h.found_inf.has_value()) {
    check_hyperparameter(*h.found_inf, "found_inf", params, values_on_host);
  }
}

// Why grad g cannot update a contiguous param p in place (kNone: it can): it must be dense (strided)
// and contiguous, with p's shape, dtype and device. Shared by the update ops' checks and grads_fit.
enum class GradMisfit { kNone, kNotStrided, kMismatch, kNotContiguous };

inline GradMisfit grad_misfit(const at::Tensor& p, const at::Tensor& g) {
  if (g.layout() != at::kStrided) {
    return GradMisfit::kNotStrided;  // before is_contiguous(), which sparse layouts do not answer
  }
  if (g.sizes() != p.sizes() || g.scalar_type() != p.scalar_type() || g.device() != p.device()) {
    return GradMisfit::kMismatch;
  }
  return g.is_contiguous() ? GradMisfit::kNone : GradMisfit::kNotContiguous;
}

// Shared by both update ops: the params/grads lists, and the hyperparameters.
inline void check_params_and_grads(at::TensorList params, at::TensorList grads) {
  TORCH_CHECK(params.size() == grads.size(), "torchsgd8: got ", params.size(), " params but ",
              grads.size(), " grads");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK(is_supported_update_dtype(p.scalar_type()),
                "torchsgd8: params must be float32, float64, bfloat16, float16 or complex; param ", i, " is ",
                p.scalar_type());
    TORCH_CHECK(p.device() == params[0].device() && p.scalar_type() == params[0].scalar_type(),
                "torchsgd8: all params of one call must share device and dtype; param ", i, " is ",
                p.scalar_type(), " on ", p.device(), ", param 0 is ", params[0].scalar_type(), " on ",
                params[0].device());
    TORCH_CHECK(p.is_contiguous(), "torchsgd8: param ", i, " is not contiguous");
    const GradMisfit misfit = grad_misfit(p, g);
    TORCH_CHECK(misfit != GradMisfit::kNotStrided, "torchsgd8: grad ", i, " has layout ", g.layout(),
                "; sparse gradients are not supported");
    TORCH_CHECK(misfit != GradMisfit::kMismatch, "torchsgd8: grad ", i, " (", g.scalar_type(), g.sizes(), " on ",
                g.device(), ") must match its param (", p.scalar_type(), p.sizes(), " on ", p.device(), ")");
    TORCH_CHECK(misfit != GradMisfit::kNotContiguous, "torchsgd8: grad ", i, " is not contiguous");
  }
}

inline void check_same_layout(at::TensorList params, at::TensorList state, const char* what,
                              bool same_dtype) {
  TORCH_CHECK(state.size() == params.size(), "torchsgd8: got ", params.size(), " params but ",
              state.size(), " ", what);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(state[i].sizes() == params[i].sizes() && state[i].device() == params[i].device() &&
                    state[i].is_contiguous(),
                "torchsgd8: ", what, "[", i, "] must be contiguous with its param's shape ",
                params[i].sizes(), " on ", params[i].device(), "; got ", state[i].sizes(), " on ",
                state[i].device());
    TORCH_CHECK(!same_dtype || state[i].scalar_type() == params[i].scalar_type(), "torchsgd8: ", what,
                "[", i, "] must have its param's dtype ", params[i].scalar_type(), ", got ",
                state[i].scalar_type());
  }
}

// The blocks `absmax` describes for codes (or values) of shape `sizes`: a vector of ceil(numel / 256)
// entries is the flat layout; for 2+ dims, a (sizes[0], ceil(row / 256)) matrix, row = prod(sizes[1:]),
// is the per-row layout. `index` names the list entry in messages (-1: a single tensor).
inline BlockLayout absmax_layout(at::IntArrayRef sizes, const at::Tensor& absmax, int64_t index) {
  const int64_t numel = c10::multiply_integers(sizes);
  if (absmax.dim() == 1 && absmax.size(0) == num_blocks(numel)) {
    return BlockLayout::rows_of(numel);
  }
  const bool has_rows = sizes.size() >= 2;
  const int64_t row_length = has_rows ? c10::multiply_integers(sizes.slice(1)) : numel;
  TORCH_CHECK(has_rows && absmax.dim() == 2 && absmax.size(0) == sizes[0] && absmax.size(1) == num_blocks(row_length),
              "torchsgd8: absmax", (index < 0 ? std::string() : "[" + std::to_string(index) + "]"),
              " must hold one float32 per 256-element block of its ", numel, " codes (shape ", sizes,
              "): shape [", num_blocks(numel), "] (flat)",
              (has_rows ? " or [" + std::to_string(sizes[0]) + ", " + std::to_string(num_blocks(row_length)) +
                              "] (blocks within each row of dim 0)"
                        : std::string()),
              "; got shape ", absmax.sizes());
  return BlockLayout::rows_of(row_length);
}

// Checks codes and absmax against their params; returns each param's block layout.
inline std::vector<BlockLayout> check_codes_and_absmax(at::TensorList params, at::TensorList codes,
                                                       at::TensorList absmax) {
  check_same_layout(params, codes, "codes", /*same_dtype=*/false);
  TORCH_CHECK(absmax.size() == params.size(), "torchsgd8: got ", params.size(), " params but ",
              absmax.size(), " absmax");
  std::vector<BlockLayout> layouts;
  layouts.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(codes[i].scalar_type() == at::kByte, "torchsgd8: codes[", i, "] must be uint8, got ",
                codes[i].scalar_type());
    const at::ScalarType t = params[i].scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf,
                "torchsgd8: 8-bit state is for float32/bfloat16/float16 params; param ", i, " is ", t);
    TORCH_CHECK(absmax[i].scalar_type() == at::kFloat && absmax[i].is_contiguous() &&
                    absmax[i].device() == params[i].device(),
                "torchsgd8: absmax[", i, "] must be a contiguous float32 tensor on ", params[i].device(),
                "; got ", absmax[i].scalar_type(), " on ", absmax[i].device());
    layouts.push_back(absmax_layout(params[i].sizes(), absmax[i], static_cast<int64_t>(i)));
  }
  return layouts;
}

// The 8-bit state's step counters: none, or one per param, each a one-element float32 tensor on the CPU (as
// bitsandbytes keeps them) or on the params' device. A step is counted where found_inf is: counters on the
// CPU cannot count a skip decided by found_inf on another device without waiting for it.
inline void check_step_counters(at::TensorList params, const std::optional<at::TensorList>& steps,
                                const std::optional<at::Tensor>& found_inf) {
  if (!steps.has_value()) {
    return;
  }
  TORCH_CHECK(steps->size() == params.size(), "torchsgd8: got ", params.size(), " params but ", steps->size(),
              " steps");
  for (size_t i = 0; i < steps->size(); ++i) {
    const at::Tensor& step = (*steps)[i];
    TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kFloat &&
                    (step.device().is_cpu() || step.device() == params[0].device()),
                "torchsgd8: steps[", i, "] must be a one-element float32 ",
                cpu_or_params_device(params, /*cpu_only=*/false), "; got ", step.scalar_type(), " of ", step.numel(),
                " elements on ", step.device());
    TORCH_CHECK(!found_inf.has_value() || found_inf->device().is_cpu() || step.device() == found_inf->device(),
                "torchsgd8: steps[", i, "] must be on ", found_inf->device(),
                ", found_inf's device (a CPU counter would have to wait for found_inf); got ", step.device());
  }
}

}  // namespace torchsgd8
