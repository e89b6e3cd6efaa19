// The `torchsgd8._C` module: `import torchsgd8._C` loads this shared library, which registers the ops
// (ops.cpp and the TORCH_LIBRARY_IMPL blocks); the ops are reached through torch.ops.torchsgd8. The module
// itself holds facts about the build for `python -m torchsgd8`, and quant.h's tables for kernels written in
// Python. Built against the stable ABI, so one wheel serves every CPython >= 3.9.
#include <Python.h>
#include <c10/util/Exception.h>

#include <exception>

#include "cpu/kernels.h"
#include "quant.h"

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
PyObject* built_against_torch(PyObject*, PyObject*) {
  return PyUnicode_FromString(TORCHSGD8_TORCH_VERSION);
}

// dict[key] = value, taking the reference to value; false (with the Python error set) if either failed.
bool set_item(PyObject* dict, const char* key, PyObject* value) {
  if (value == nullptr) {
    return false;
  }
  const int status = PyDict_SetItemString(dict, key, value);
  Py_DECREF(value);
  return status == 0;
}

template <typename T, size_t N>
PyObject* as_bytes(const T (&table)[N]) {
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(table), sizeof(table));
}

// quant.h's codebook and nearest-code table, for kernels written in Python (torch.frombuffer makes tensors of
// the native-endian bytes), so that they are written in one place.
PyObject* quant_tables(PyObject*, PyObject*) {
  PyObject* tables = PyDict_New();
  if (tables == nullptr) {
    return nullptr;
  }
  const bool ok = set_item(tables, "signed_dynamic_map", as_bytes(torchsgd8::kSignedDynamicMap)) &&
                  set_item(tables, "bucket_table", as_bytes(torchsgd8::kBucketTable)) &&
                  set_item(tables, "bucket_shift", PyLong_FromLong(torchsgd8::kBucketShift)) &&
                  set_item(tables, "bucket_offset", PyLong_FromLong(torchsgd8::kBucketOffset)) &&
                  set_item(tables, "block_size", PyLong_FromLong(torchsgd8::kBlockSize)) &&
                  set_item(tables, "zero_code", PyLong_FromLong(torchsgd8::kZeroCode));
  if (!ok) {
    Py_DECREF(tables);
    return nullptr;
  }
  return tables;
}

PyMethodDef module_methods[] = {
    {"built_against_torch", built_against_torch, METH_NOARGS, "torch version this library was compiled against."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels in use (DEFAULT, AVX2 or AVX512)."},
    {"cpu_prefetch", cpu_prefetch, METH_NOARGS, "Whether the CPU kernels prefetch ahead in software (8-bit state; 16-bit params)."},
    {"cpu_gather", cpu_gather, METH_NOARGS, "Whether the AVX2 kernels read tables by gathers, not scalar loads."},
    {"quant_tables", quant_tables, METH_NOARGS,
     "quant.h's tables: signed_dynamic_map (bytes, 256 float32), bucket_table (bytes, int32), bucket_shift, "
     "bucket_offset, block_size, zero_code."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}
}
