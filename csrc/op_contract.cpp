// What the public ops of ops.cpp mean, written once for every device: argument checks, complex tensors viewed
// as real, outputs allocated, the state of a first step that the kernels do not write, the step counters.
// Each device supplies only its kernels (device_kernels.h): the compiled CPU kernels, or the kernel ops.
//
// These are the ops' CPU, CUDA and XPU kernels. They run below autograd (autograd.cpp has already rejected
// inputs requiring grad, and bumps the versions of written tensors once the op returns), so the ops they
// call - the kernel ops, masked_fill_ and the like - run below autograd too: no second check, no second bump.
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "device_kernels.h"
#include "op_checks.h"
#include "quant.h"

namespace torchsgd8 {
namespace {

template <c10::DispatchKey kKey>
void sgd_update_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, const at::Tensor& lr,
                 const at::Tensor& momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                 bool first_step, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& rounding_seed) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const DeviceKernels& kernels = kernels_for(kKey, KernelOp::kSgdUpdate);
  check_params_and_grads(params, grads);
  if (!momentum_buffers.empty()) {
    check_same_layout(params, momentum_buffers, "momentum_buffers", /*same_dtype=*/true);
  }
  const UpdateHyper hyper{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                          grad_scale, found_inf, rounding_seed};
  check_hyperparameters(params, hyper, kernels.reads_values_on_host());
  if (params.empty()) {
    return;
  }
  const std::vector<at::Tensor> buffers = as_real(momentum_buffers);
  const UpdateOutcome outcome = kernels.sgd_update(as_real(params), as_real(grads), buffers, hyper);
  if (first_step) {
    // The buffers of a first step are output only (the optimizer allocates them uninitialised): where the
    // kernel did not write them - a skipped step, a momentum value of 0 - they become empty momentum.
    (outcome.skipped || outcome.momentum_is_zero).fill(buffers, 0);
  }
}

template <c10::DispatchKey kKey>
void sgd8bit_update_(at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList absmax,
                     const at::Tensor& lr, const at::Tensor& momentum, double dampening, double weight_decay,
                     bool nesterov, bool maximize, bool first_step, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& rounding_seed,
                     const std::optional<at::TensorList>& steps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const DeviceKernels& kernels = kernels_for(kKey, KernelOp::kSgd8bitUpdate);
  check_params_and_grads(params, grads);
  const std::vector<BlockLayout> layouts = check_codes_and_absmax(params, codes, absmax);
  check_step_counters(params, steps, found_inf);
  const UpdateHyper hyper{lr, momentum, dampening, weight_decay, nesterov, maximize, first_step,
                          grad_scale, found_inf, rounding_seed};
  check_hyperparameters(params, hyper, kernels.reads_values_on_host());
  if (params.empty()) {
    return;
  }
  const Condition skipped = kernels.sgd8bit_update(params, grads, codes, absmax, layouts, hyper);
  if (first_step) {
    // The kernel writes all the state of a first step that runs; a skipped one's becomes empty momentum
    // (see sgd_update_).
    skipped.fill(codes, kZeroCode);
    skipped.fill(absmax, 0);
  }
  if (steps.has_value()) {
    skipped.count_unless(*steps);
  }
}

template <c10::DispatchKey kKey>
std::tuple<at::Tensor, at::Tensor> quantize_blockwise(const at::Tensor& values, bool per_row) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const DeviceKernels& kernels = kernels_for(kKey, KernelOp::kQuantizeBlockwise);
  TORCH_CHECK(is_supported_param_dtype(values.scalar_type()),
              "torchsgd8.quantize_blockwise: values must be float32, float64, bfloat16 or float16, got ",
              values.scalar_type());
  TORCH_CHECK(!per_row || values.dim() >= 2, "torchsgd8.quantize_blockwise: per_row needs 2 or more dims, got ",
              values.dim());
  const BlockLayout layout =
      BlockLayout::rows_of(per_row ? c10::multiply_integers(values.sizes().slice(1)) : values.numel());
  at::Tensor codes = at::empty(values.sizes(), values.options().dtype(at::kByte));
  at::Tensor absmax = per_row ? at::empty({values.size(0), layout.blocks_per_row}, values.options().dtype(at::kFloat))
                              : at::empty({layout.blocks_per_row}, values.options().dtype(at::kFloat));
  kernels.quantize_blockwise(values.contiguous(), codes, absmax, layout);
  return {codes, absmax};
}

template <c10::DispatchKey kKey>
at::Tensor dequantize_blockwise(const at::Tensor& codes, const at::Tensor& absmax, at::ScalarType dtype) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const DeviceKernels& kernels = kernels_for(kKey, KernelOp::kDequantizeBlockwise);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "torchsgd8.dequantize_blockwise: codes must be uint8, got ",
              codes.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "torchsgd8.dequantize_blockwise: absmax must be float32, got ",
              absmax.scalar_type());
  const BlockLayout layout = absmax_layout(codes.sizes(), absmax, /*index=*/-1);
  TORCH_CHECK(is_supported_param_dtype(dtype),
              "torchsgd8.dequantize_blockwise: dtype must be float32, float64, bfloat16 or float16, got ", dtype);
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  kernels.dequantize_blockwise(codes.contiguous(), absmax.contiguous(), out, layout);
  return out;
}

template <c10::DispatchKey kKey>
void register_ops(torch::Library& m) {
  m.impl("sgd_update_", &sgd_update_<kKey>);
  m.impl("sgd8bit_update_", &sgd8bit_update_<kKey>);
  m.impl("quantize_blockwise", &quantize_blockwise<kKey>);
  m.impl("dequantize_blockwise", &dequantize_blockwise<kKey>);
}

}  // namespace

// CUDA and XPU are registered in every build (no toolkit needed): their kernels are kernel ops registered
// from Python, and without one the ops say so.
TORCH_LIBRARY_IMPL(torchsgd8, CPU, m) {
  register_ops<c10::DispatchKey::CPU>(m);
}
TORCH_LIBRARY_IMPL(torchsgd8, CUDA, m) {
  register_ops<c10::DispatchKey::CUDA>(m);
}
TORCH_LIBRARY_IMPL(torchsgd8, XPU, m) {
  register_ops<c10::DispatchKey::XPU>(m);
}

}  // namespace torchsgd8
