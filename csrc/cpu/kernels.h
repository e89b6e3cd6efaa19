// The CPU kernels' entry points. sgd_kernels.cpp is compiled once per instruction set (see CMakeLists.txt),
// each copy in its own namespace; kernel_selection.cpp picks one at run time.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../quant.h"
#include "../sgd_rule.h"

namespace torchsgd8::cpu {

// One kernel set. The ops (csrc/op_contract.cpp) call these with checked arguments, complex tensors viewed
// as real, hyperparameters read on the host; a skipped step (found_inf) never reaches them.
struct KernelTable {
  const char* isa;
  void (*sgd_update)(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     const SgdHyper<double>& hyper);
  void (*sgd8bit_update)(at::TensorList params, at::TensorList grads, at::TensorList codes,
                         at::TensorList absmax, const std::vector<BlockLayout>& layouts,
                         const SgdHyper<double>& hyper);
  void (*quantize_blockwise)(const at::Tensor& values, const at::Tensor& codes, const at::Tensor& absmax,
                             BlockLayout layout);
  void (*dequantize_blockwise)(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& out,
                               BlockLayout layout);
};

namespace DEFAULT {
extern const KernelTable kKernels;
}
#if defined(TORCHSGD8_HAVE_AVX2)
namespace AVX2 {
extern const KernelTable kKernels;
}
#endif
#if defined(TORCHSGD8_HAVE_AVX512)
namespace AVX512 {
extern const KernelTable kKernels;
}
#endif

// The table used by the ops: the widest ISA this CPU supports, unless TORCHSGD8_CPU_ISA names another.
const KernelTable& kernels();

// Tuning of the CPU kernels, each read once per process; results are the same bits either way.
// Whether the 8-bit kernels prefetch ahead in software: on Intel CPUs, unless TORCHSGD8_CPU_PREFETCH=0|1
// says otherwise.
bool prefetch_ahead();
// Whether the AVX2 kernels read their tables with gathers rather than scalar loads: on Intel CPUs with
// AVX-VNNI (Alder Lake, Sapphire Rapids and later), unless TORCHSGD8_CPU_GATHER=0|1 says otherwise.
bool gather_table_reads();

}  // namespace torchsgd8::cpu
