// Autograd and version-counter handling for every torchsgd8 op (device independent).
//
// An optimizer update is not differentiable: with grad mode on, an op that receives a tensor requiring
// grad raises a clear error instead of silently producing results autograd cannot see. (optimizer.step()
// runs under torch.no_grad(), so training is unaffected.) In-place ops bump the version counters of the
// tensors they write, so autograd notices if a tensor saved for backward was modified.
//
// Not torch's autogradNotImplemented(InplaceOrView)Fallback: it raises only in backward (or check_inplace's
// leaf error), and bumps the versions of written outputs, where our ops write arguments and return nothing.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <vector>

namespace torchsgd8 {
namespace {

template <typename Fn>
void for_each_tensor(const c10::IValue& value, const Fn& fn) {
  if (value.isTensor()) {
    fn(value.toTensor());
  } else if (value.isTensorList()) {
    for (const at::Tensor& t : value.toTensorList().vec()) {
      fn(t);
    }
  } else if (value.isOptionalTensorList()) {
    for (const auto& t : value.toOptionalTensorList().vec()) {
      if (t.has_value()) {
        fn(*t);
      }
    }
  }
}

bool writes(const c10::AliasInfo* alias) {
  if (alias == nullptr) {
    return false;
  }
  if (alias->isWrite()) {
    return true;
  }
  for (const auto& contained : alias->containedTypes()) {
    if (contained.isWrite()) {
      return true;
    }
  }
  return false;
}

void reject_requires_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const size_t n = op.schema().arguments().size();
    for (const c10::IValue& value : torch::jit::last(*stack, n)) {
      for_each_tensor(value, [&](const at::Tensor& t) {
        TORCH_CHECK(!(t.defined() && t.requires_grad()), op.schema().name(),
                    " is not differentiable, but an input requires grad. Call it under torch.no_grad() "
                    "(optimizer.step() does) or pass detached tensors.");
      });
    }
  }
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void bump_versions_of_written(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  std::vector<at::Tensor> written;
  const auto inputs = torch::jit::last(*stack, arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (writes(arguments[i].alias_info())) {
      for_each_tensor(inputs[i], [&](const at::Tensor& t) { written.push_back(t); });
    }
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const at::Tensor& t : written) {
    torch::autograd::impl::bump_version(t);
  }
}

}  // namespace

// The kernel ops too, for direct calls; the public ops call them below autograd.
TORCH_LIBRARY_IMPL(torchsgd8, Autograd, m) {
  for (const char* op : {"sgd_update_", "sgd8bit_update_", "quantize_blockwise", "dequantize_blockwise",
                         "_sgd_update_kernel_", "_sgd8bit_update_kernel_", "_quantize_blockwise_kernel_",
                         "_dequantize_blockwise_kernel_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&reject_requires_grad>());
  }
}

TORCH_LIBRARY_IMPL(torchsgd8, ADInplaceOrView, m) {
  for (const char* op : {"sgd_update_", "sgd8bit_update_", "_sgd_update_kernel_", "_sgd8bit_update_kernel_",
                         "_quantize_blockwise_kernel_", "_dequantize_blockwise_kernel_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&bump_versions_of_written>());
  }
}

}  // namespace torchsgd8
