// The public API of torchsgd8: every op schema, in one table. What the ops do on every device is written
// once in op_contract.cpp, which calls each device's kernels: the compiled CPU kernels (csrc/cpu/), or the
// kernel ops at the end of this table. Fake (meta) implementations are in torchsgd8/ops.py.
//
// Conventions: ops ending in `_` update their `(a!)` arguments in place and return nothing. Hyper-
// parameters that schedules change every step (lr, momentum) are 0-dim tensors, so a compiled step
// does not specialise on their values. `first_step` means the momentum buffers were just created (they
// are not read: buffer = gradient, as torch.optim.SGD does). `grad_scale` / `found_inf` are the
// GradScaler protocol of torch's fused optimizers: grads are divided by grad_scale, and when found_inf
// is nonzero nothing at all is changed. `rounding_seed` (an int64 0-dim tensor; bf16 params only)
// turns on stochastic rounding of the new params, reproducible for a given seed.
#include <torch/library.h>

TORCH_LIBRARY(torchsgd8, m) {
  // fp32-precision momentum (buffers in the param dtype, like torch.optim.SGD); momentum_buffers is
  // empty when momentum == 0. One call updates a whole list of same-device, same-dtype params. With
  // first_step the state (buffers; codes and absmax) is output only: never read, always written (zeros
  // where the step is skipped or the momentum value is 0), so it may be allocated uninitialised.
  m.def(
      "sgd_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor lr, "
      "Tensor momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_step, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? rounding_seed=None) -> ()");
  // 8-bit momentum: per param, uint8 codes (param's shape) and float32 absmax, one per 256-element
  // block: a vector for the flat layout, a (rows, blocks per row) matrix for blocks within each index of
  // dim 0 (quant.h, BlockLayout). Dequantize, update, requantize each block in one pass. steps, if given:
  // the state's step counters (one-element float32 tensors, one per param, on the CPU or on the params'
  // device), each += 1 unless found_inf is nonzero (a step the GradScaler skips does not count). Counting here spares each step an op call of
  // its own, whose dispatch costs tens of microseconds when a backward pass has left the caches cold.
  m.def(
      "sgd8bit_update_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] codes, Tensor(c!)[] absmax, "
      "Tensor lr, Tensor momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_step, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? rounding_seed=None, "
      "Tensor(d!)[]? steps=None) -> ()");
  // whether one update call could take these params and grads: all params on one device, contiguous;
  // each grad dense, contiguous, with its param's shape, dtype and device (csrc/checks.cpp)
  m.def("grads_fit(Tensor[] params, Tensor[] grads) -> bool");
  // values -> (uint8 codes of values' shape, float32 absmax): absmax[ceil(numel / 256)], or with
  // per_row absmax[size(0), ceil(row / 256)] with blocks restarting at each index of dim 0
  m.def("quantize_blockwise(Tensor values, bool per_row=False) -> (Tensor codes, Tensor absmax)");
  // (codes, absmax) -> values of dtype `dtype` and codes' shape; absmax's shape gives the layout
  m.def("dequantize_blockwise(Tensor codes, Tensor absmax, ScalarType dtype) -> Tensor");

  // ---- kernel ops: the kernels of devices whose kernels are not C++ ----
  // One per public op; the public ops call them on CUDA and XPU (and on the CPU where a kernel is registered
  // for it, which only tests do). An implementation registers for its exact dispatch key, e.g.
  // torch.library.impl("torchsgd8::_sgd8bit_update_kernel_", "CUDA"), and may rely on, and must do, this:
  //  * Arguments are checked as for the public op, complex params, grads and buffers are viewed as real, and
  //    params are never empty. lr, momentum, grad_scale, found_inf and rounding_seed are passed as the public
  //    op got them: one-element tensors on the params' device or on the CPU. Read none on the host: a device
  //    tensor's value would wait for the device, and a value read while a CUDA graph is captured would be
  //    replayed unchanged.
  //  * found_inf nonzero: write nothing at all. The public op then turns a first step's state into empty
  //    momentum and leaves the step counters alone; it counts the steps in every other case.
  //  * first_step: the state is output only (uninitialised memory): buffer = d, never read.
  //  * momentum value 0 (read on the device): plain SGD. _sgd_update_kernel_ neither reads nor writes the
  //    buffers (the public op zeroes a first step's); _sgd8bit_update_kernel_ writes the state as the CPU
  //    kernels do (a first step's all zero: codes 127, absmax 0; otherwise the old buffer requantized).
  //  * The rule of csrc/sgd_rule.h and the codebook, nearest code and block layouts of csrc/quant.h (their
  //    tables: torchsgd8._C.quant_tables()); absmax's shape gives the layout, a vector flat blocks, a
  //    (rows, blocks per row) matrix blocks within each index of dim 0.
  //  * rounding_seed (int64; bf16 params only): the new params are rounded stochastically, with the noise of
  //    sgd_rule.h's rounding_noise(seed, index of the tensor in the list, index of the element in it).
  m.def(
      "_sgd_update_kernel_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor lr, "
      "Tensor momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? rounding_seed) -> ()");
  m.def(
      "_sgd8bit_update_kernel_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] codes, Tensor(c!)[] absmax, "
      "Tensor lr, Tensor momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool first_step, Tensor? grad_scale, Tensor? found_inf, Tensor? rounding_seed) -> ()");
  // values (contiguous) -> codes, absmax, both allocated by the public op with their final shapes
  m.def("_quantize_blockwise_kernel_(Tensor values, Tensor(a!) codes, Tensor(b!) absmax) -> ()");
  // codes, absmax (contiguous) -> out, allocated by the public op with the requested dtype
  m.def("_dequantize_blockwise_kernel_(Tensor codes, Tensor absmax, Tensor(a!) out) -> ()");
}
