// How the ops (op_contract.cpp) reach a device's kernels: one small interface, DeviceKernels, with two
// implementations. The compiled CPU kernels (csrc/cpu/) read the hyperparameters on the host. The kernel
// ops of ops.cpp (`_sgd_update_kernel_` and the like) serve devices whose kernels are not C++ (Triton
// kernels, registered from Python for CUDA or XPU); they read nothing on the host.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DispatchKey.h>

#include <vector>

#include "op_checks.h"
#include "quant.h"

namespace torchsgd8 {

// A yes/no fact about one update call that the ops act on: whether the step is skipped (found_inf nonzero),
// whether the momentum value is 0. Known on the host where the kernels read values there; else tests of
// one-element tensors, evaluated on the params' device only where the ops act on the condition (a first
// step's state, step counters), so nothing waits for the device and an unused condition costs no launch.
class Condition {
 public:
  static Condition known(bool value);
  // `value != 0` / `value == 0` for a one-element tensor and params on `device`: read on the host where
  // `value` is on the CPU and the params are not (which needs no sync), else tested on `device`.
  static Condition nonzero(const at::Tensor& value, at::Device device);
  static Condition zero(const at::Tensor& value, at::Device device);

  Condition operator||(const Condition& other) const;
  // Fills the tensors with `value` where the condition holds.
  void fill(at::TensorList tensors, const at::Scalar& value) const;
  // Adds 1 to each one-element counter where the condition does not hold. Counters on the CPU need a
  // condition known on the host (check_step_counters).
  void count_unless(at::TensorList counters) const;

 private:
  struct DeviceTest {
    at::Tensor value;
    bool holds_when_nonzero;
  };

  explicit Condition(bool known) : known_(known) {}
  bool is_known() const {
    return tests_.empty();
  }
  // The condition as a 0-dim bool tensor on the device: the OR of the tests.
  at::Tensor on_device() const;

  bool known_;                     // the condition, where is_known()
  std::vector<DeviceTest> tests_;  // else: it holds where any of these does
};

// What an update kernel tells the ops about the call it ran.
struct UpdateOutcome {
  Condition skipped;           // found_inf was nonzero: the kernel wrote nothing
  Condition momentum_is_zero;  // the buffers were neither read nor written
};

// A device's kernels. The ops call them after checking every argument, with complex tensors viewed as real
// and params never empty. A kernel honours found_inf (writes nothing when it is nonzero); the ops then
// complete the contract: the state of a first step that a kernel did not write, the step counters.
class DeviceKernels {
 public:
  explicit DeviceKernels(bool reads_values_on_host) : reads_values_on_host_(reads_values_on_host) {}
  virtual ~DeviceKernels() = default;

  // Whether the kernels read hyperparameter values on the host; then lr, momentum, grad_scale, found_inf and
  // rounding_seed must be CPU tensors, else they may also be on the params' device.
  bool reads_values_on_host() const {
    return reads_values_on_host_;
  }
  virtual UpdateOutcome sgd_update(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                   const UpdateHyper& hyper) const = 0;
  // Writes the whole state on a first step that runs, also with a momentum value of 0. Returns `skipped`.
  virtual Condition sgd8bit_update(at::TensorList params, at::TensorList grads, at::TensorList codes,
                                   at::TensorList absmax, const std::vector<BlockLayout>& layouts,
                                   const UpdateHyper& hyper) const = 0;
  virtual void quantize_blockwise(const at::Tensor& values, const at::Tensor& codes, const at::Tensor& absmax,
                                  BlockLayout layout) const = 0;
  virtual void dequantize_blockwise(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& out,
                                    BlockLayout layout) const = 0;

 private:
  bool reads_values_on_host_;
};

// The public op whose kernels are asked for (each has its own kernel op).
enum class KernelOp { kSgdUpdate, kSgd8bitUpdate, kQuantizeBlockwise, kDequantizeBlockwise };

// The kernels for tensors of dispatch key `key` (CPU, CUDA or XPU): the kernel op where it has a kernel
// registered for `key`, else the compiled CPU kernels for the CPU. Raises NotImplementedError naming the
// device where there is neither.
const DeviceKernels& kernels_for(c10::DispatchKey key, KernelOp op);

}  // namespace torchsgd8
