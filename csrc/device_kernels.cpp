// The two implementations of DeviceKernels (device_kernels.h) and the choice between them.
#include "device_kernels.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceType.h>
#include <c10/core/TensorOptions.h>

#include <array>
#include <optional>

#include "cpu/kernels.h"

namespace torchsgd8 {

// ---- Condition ----

Condition Condition::known(bool value) {
  return Condition(value);
}

Condition Condition::nonzero(const at::Tensor& value, at::Device device) {
  if (value.device().is_cpu() && !device.is_cpu()) {
    return known(value.item<double>() != 0.0);
  }
  Condition condition(false);
  condition.tests_.push_back({value, /*holds_when_nonzero=*/true});
  return condition;
}

Condition Condition::zero(const at::Tensor& value, at::Device device) {
  if (value.device().is_cpu() && !device.is_cpu()) {
    return known(value.item<double>() == 0.0);
  }
  Condition condition(false);
  condition.tests_.push_back({value, /*holds_when_nonzero=*/false});
  return condition;
}

Condition Condition::operator||(const Condition& other) const {
  if (is_known()) {
    return known_ ? *this : other;
  }
  if (other.is_known()) {
    return other.known_ ? other : *this;
  }
  Condition either = *this;
  either.tests_.insert(either.tests_.end(), other.tests_.begin(), other.tests_.end());
  return either;
}

at::Tensor Condition::on_device() const {
  at::Tensor holds;
  for (const DeviceTest& test : tests_) {
    const at::Tensor value = test.value.reshape({});
    const at::Tensor result = test.holds_when_nonzero ? value.ne(0) : value.eq(0);
    holds = holds.defined() ? at::logical_or(holds, result) : result;
  }
  return holds;
}

void Condition::fill(at::TensorList tensors, const at::Scalar& value) const {
  if (tensors.empty() || (is_known() && !known_)) {
    return;
  }
  const at::Tensor mask = is_known() ? at::Tensor() : on_device();
  for (const at::Tensor& t : tensors) {
    if (mask.defined()) {
      t.masked_fill_(mask, value);
    } else {
      t.fill_(value);
    }
  }
}

void Condition::count_unless(at::TensorList counters) const {
  if (counters.empty()) {
    return;
  }
  if (!is_known()) {
    at::_foreach_add_(counters, at::logical_not(on_device()).to(at::kFloat));
    return;
  }
  if (known_) {
    return;
  }
  std::vector<at::Tensor> on_device;
  for (const at::Tensor& counter : counters) {
    if (counter.device().is_cpu()) {
      *counter.data_ptr<float>() += 1.0f;
    } else {
      on_device.push_back(counter);
    }
  }
  if (!on_device.empty()) {
    at::_foreach_add_(on_device, 1);
  }
}

namespace {

// ---- the compiled CPU kernels ----

double read_value(const at::Tensor& t) {
  return t.item().toDouble();
}

// The hyperparameters as the compiled kernels take them, read once per call.
SgdHyper<double> read_hyper(const UpdateHyper& h, bool use_momentum) {
  SgdHyper<double> hyper;
  hyper.lr = read_value(h.lr);
  hyper.momentum = read_value(h.momentum);
  hyper.dampening_complement = 1.0 - h.dampening;
  hyper.weight_decay = h.weight_decay;
  hyper.unscale = h.grad_scale.has_value();
  hyper.grad_scale = hyper.unscale ? read_value(*h.grad_scale) : 1.0;
  // a momentum tensor whose value is 0 means plain SGD, as torch.optim.SGD decides by value: the buffer
  // is neither read nor written
  hyper.use_momentum = use_momentum && hyper.momentum != 0.0;
  hyper.first_step = h.first_step;
  hyper.nesterov = h.nesterov;
  hyper.maximize = h.maximize;
  hyper.stochastic_rounding = h.rounding_seed.has_value();
  hyper.rounding_seed = hyper.stochastic_rounding ? static_cast<uint64_t>(h.rounding_seed->item<int64_t>()) : 0;
  return hyper;
}

bool found_inf_nonzero(const UpdateHyper& h) {
  return h.found_inf.has_value() && read_value(*h.found_inf) != 0.0;
}

// csrc/cpu/, for this CPU's instruction set. A skipped step does not reach them.
class CompiledCpuKernels final : public DeviceKernels {
 public:
  CompiledCpuKernels() : DeviceKernels(/*reads_values_on_host=*/true) {}

  UpdateOutcome sgd_update(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           const UpdateHyper& h) const override {
    const SgdHyper<double> hyper = read_hyper(h, /*use_momentum=*/!momentum_buffers.empty());
    const bool skipped = found_inf_nonzero(h);
    if (!skipped) {
      cpu::kernels().sgd_update(params, grads, momentum_buffers, hyper);
    }
    return {Condition::known(skipped), Condition::known(hyper.momentum == 0.0)};
  }

  Condition sgd8bit_update(at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList absmax,
                           const std::vector<BlockLayout>& layouts, const UpdateHyper& h) const override {
    const SgdHyper<double> hyper = read_hyper(h, /*use_momentum=*/true);
    const bool skipped = found_inf_nonzero(h);
    if (!skipped) {
      cpu::kernels().sgd8bit_update(params, grads, codes, absmax, layouts, hyper);
    }
    return Condition::known(skipped);
  }

  void quantize_blockwise(const at::Tensor& values, const at::Tensor& codes, const at::Tensor& absmax,
                          BlockLayout layout) const override {
    cpu::kernels().quantize_blockwise(values, codes, absmax, layout);
  }

  void dequantize_blockwise(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& out,
                            BlockLayout layout) const override {
    cpu::kernels().dequantize_blockwise(codes, absmax, out, layout);
  }
};

// ---- the kernel ops ----

const c10::OperatorHandle& kernel_op(KernelOp op) {
  static const std::array<c10::OperatorHandle, 4> handles = [] {
    auto& dispatcher = c10::Dispatcher::singleton();
    return std::array<c10::OperatorHandle, 4>{
        dispatcher.findSchemaOrThrow("torchsgd8::_sgd_update_kernel_", ""),
        dispatcher.findSchemaOrThrow("torchsgd8::_sgd8bit_update_kernel_", ""),
        dispatcher.findSchemaOrThrow("torchsgd8::_quantize_blockwise_kernel_", ""),
        dispatcher.findSchemaOrThrow("torchsgd8::_dequantize_blockwise_kernel_", "")};
  }();
  return handles[static_cast<size_t>(op)];
}

using UpdateKernelSignature = void(at::TensorList, at::TensorList, at::TensorList, const at::Tensor&,
                                   const at::Tensor&, double, double, bool, bool, bool,
                                   const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&);
using Update8bitKernelSignature = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                       const at::Tensor&, const at::Tensor&, double, double, bool, bool, bool,
                                       const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                       const std::optional<at::Tensor>&);
using BlockwiseKernelSignature = void(const at::Tensor&, const at::Tensor&, const at::Tensor&);

Condition skipped_on(const UpdateHyper& h, at::Device device) {
  return h.found_inf.has_value() ? Condition::nonzero(*h.found_inf, device) : Condition::known(false);
}

// The kernel ops through the dispatcher, with every tensor as the op received it: nothing is read on the host
// (a CPU tensor is read where the params are on another device, which needs no sync).
class KernelOpKernels final : public DeviceKernels {
 public:
  KernelOpKernels() : DeviceKernels(/*reads_values_on_host=*/false) {}

  UpdateOutcome sgd_update(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           const UpdateHyper& h) const override {
    static const auto op = kernel_op(KernelOp::kSgdUpdate).typed<UpdateKernelSignature>();
    op.call(params, grads, momentum_buffers, h.lr, h.momentum, h.dampening, h.weight_decay, h.nesterov, h.maximize,
            h.first_step, h.grad_scale, h.found_inf, h.rounding_seed);
    const at::Device device = params[0].device();
    // without buffers, nothing depends on the momentum value
    return {skipped_on(h, device),
            momentum_buffers.empty() ? Condition::known(false) : Condition::zero(h.momentum, device)};
  }

  Condition sgd8bit_update(at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList absmax,
                           const std::vector<BlockLayout>&, const UpdateHyper& h) const override {
    static const auto op = kernel_op(KernelOp::kSgd8bitUpdate).typed<Update8bitKernelSignature>();
    op.call(params, grads, codes, absmax, h.lr, h.momentum, h.dampening, h.weight_decay, h.nesterov, h.maximize,
            h.first_step, h.grad_scale, h.found_inf, h.rounding_seed);
    return skipped_on(h, params[0].device());
  }

  void quantize_blockwise(const at::Tensor& values, const at::Tensor& codes, const at::Tensor& absmax,
                          BlockLayout) const override {
    static const auto op = kernel_op(KernelOp::kQuantizeBlockwise).typed<BlockwiseKernelSignature>();
    op.call(values, codes, absmax);
  }

  void dequantize_blockwise(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& out,
                            BlockLayout) const override {
    static const auto op = kernel_op(KernelOp::kDequantizeBlockwise).typed<BlockwiseKernelSignature>();
    op.call(codes, absmax, out);
  }
};

}  // namespace

const DeviceKernels& kernels_for(c10::DispatchKey key, KernelOp op) {
  static const CompiledCpuKernels compiled_cpu_kernels;
  static const KernelOpKernels kernel_op_kernels;
  if (kernel_op(op).hasKernelForDispatchKey(key)) {
    return kernel_op_kernels;
  }
  if (key == c10::DispatchKey::CPU) {
    return compiled_cpu_kernels;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(false, "torchsgd8: no kernels for device ",
                              c10::DeviceTypeName(c10::dispatchKeyToDeviceType(key), /*lower_case=*/true),
                              ": the GPU kernels are Triton kernels; install triton");
}

}  // namespace torchsgd8
