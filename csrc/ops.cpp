// The public API of torchsgd8: every op schema, in one table. Kernels live in csrc/<device>/,
// fake (meta) implementations in torchsgd8/ops.py.
//
// Conventions: ops ending in `_` update their `(a!)` arguments in place and return nothing. Hyper-
// parameters that schedules change every step (lr, momentum) are 0-dim tensors, so a compiled step
// does not specialise on their values. `first_step` means the momentum buffers were just created (they
// are not read: buffer = gradient, as torch.optim.SGD does). `grad_scale` / `found_inf` are the
// GradScaler protocol of torch's fused optimizers: grads are divided by grad_scale, and when found_inf
// is nonzero nothing at all is changed. `rounding_seed` (an int64 0-dim tensor; bf16 params only)
// turns on stochastic rounding of the new params, reproducible for a given seed.
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <exception>

#include "cpu/kernels.h"

namespace {
// A C++ exception must not cross the C API (it would abort the interpreter): raise RuntimeError instead.
template <typename Fn>
PyObject* python_result(const Fn& fn) {
  try {
    return fn();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

// Build facts for `python -m torchsgd8`; the ops themselves are reached through torch.ops.torchsgd8.
// The CPU ones read TORCHSGD8_CPU_ISA / _PREFETCH / _GATHER, which may be invalid.
PyObject* cpu_isa(PyObject*, PyObject*) {
  return python_result([] { return PyUnicode_FromString(torchsgd8::cpu::kernels().isa); });
}
PyObject* cpu_prefetch(PyObject*, PyObject*) {
  return python_result([] { return PyBool_FromLong(torchsgd8::cpu::prefetch_ahead()); });
}
PyObject* cpu_gather(PyObject*, PyObject*) {
  return python_result([] { return PyBool_FromLong(torchsgd8::cpu::gather_table_reads()); });
}
PyObject* cuda_kernels_compiled(PyObject*, PyObject*) {
#if defined(TORCHSGD8_WITH_CUDA)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}
PyObject* built_against_torch(PyObject*, PyObject*) {
  return PyUnicode_FromString(TORCHSGD8_TORCH_VERSION);
}
PyMethodDef module_methods[] = {
    {"built_against_torch", built_against_torch, METH_NOARGS, "torch version this library was compiled against."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels in use (DEFAULT, AVX2 or AVX512)."},
    {"cpu_prefetch", cpu_prefetch, METH_NOARGS, "Whether the CPU kernels prefetch ahead in software (8-bit state; 16-bit params)."},
    {"cpu_gather", cpu_gather, METH_NOARGS, "Whether the AVX2 kernels read tables by gathers, not scalar loads."},
    {"cuda_kernels_compiled", cuda_kernels_compiled, METH_NOARGS, "Whether CUDA kernels are built in."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// `import torchsgd8._C` loads this shared library (and so runs the registrations below). Built against
// the stable ABI, so one wheel serves every CPython >= 3.9.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}
}

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
  // the state's step counters (one-element float32 CPU tensors, one per param), each += 1 unless found_inf
  // is nonzero (a step the GradScaler skips does not count). Counting here spares each step an op call of
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
}
