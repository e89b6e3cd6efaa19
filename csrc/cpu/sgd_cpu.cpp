// TORCH_LIBRARY_IMPL(torchsgd8, CPU): argument checks, then the kernel table for this CPU's ISA.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "../op_checks.h"
#include "kernels.h"

namespace torchsgd8::cpu {

namespace {

bool cpu_supports_avx2() {
#if defined(TORCHSGD8_HAVE_AVX2) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_supports_avx512() {
#if defined(TORCHSGD8_HAVE_AVX512) && (defined(__GNUC__) || defined(__clang__))
  return cpu_supports_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vbmi");
#else
  return false;
#endif
}

// An on/off setting: the environment variable `name` ("0" or "1"), else `otherwise`.
bool switch_from_env(const char* name, bool otherwise) {
  const char* value = std::getenv(name);
  if (value == nullptr) {
    return otherwise;
  }
  const std::string choice = value;
  TORCH_CHECK(choice == "0" || choice == "1", "torchsgd8: ", name, " must be '0' or '1', got '", choice, "'");
  return choice == "1";
}

bool cpu_is_intel() {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_is("intel") != 0;
#else
  return false;
#endif
}

// Gathers are fast on current Intel cores (3.6 TSC cycles per 8 lanes measured on a Sapphire Rapids-class
// Xeon), slower on Haswell and Broadwell, several times slower on Skylake to Ice Lake under the Gather
// Data Sampling ("Downfall") microcode, and microcoded on AMD up to Zen 2. AVX-VNNI (CPUID.(7,1):EAX[4])
// marks the Intel cores since Alder Lake and Sapphire Rapids, none of which the mitigation slows.
bool intel_gathers_are_fast() {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  const bool avx_vnni = __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 4)) != 0;
  return cpu_is_intel() && avx_vnni;
#else
  return false;
#endif
}

// TORCHSGD8_CPU_ISA=default|avx2|avx512 forces a kernel set (for tests and benchmarks); unset, the widest
// one this CPU runs is used.
const KernelTable& select_kernels() {
  const char* forced = std::getenv("TORCHSGD8_CPU_ISA");
  const std::string choice = forced ? forced : "";
  TORCH_CHECK(choice.empty() || choice == "default" || choice == "avx2" || choice == "avx512",
              "torchsgd8: TORCHSGD8_CPU_ISA must be 'default', 'avx2' or 'avx512', got '", choice, "'");
#if defined(TORCHSGD8_HAVE_AVX512)
  if ((choice.empty() || choice == "avx512") && cpu_supports_avx512()) {
    return AVX512::kKernels;
  }
#endif
  TORCH_CHECK(choice != "avx512", "torchsgd8: TORCHSGD8_CPU_ISA=avx512 but this CPU or build lacks AVX-512 ",
              "(F, BW, VL, DQ and VBMI)");
#if defined(TORCHSGD8_HAVE_AVX2)
  if ((choice.empty() || choice == "avx2") && cpu_supports_avx2()) {
    return AVX2::kKernels;
  }
#endif
  TORCH_CHECK(choice != "avx2", "torchsgd8: TORCHSGD8_CPU_ISA=avx2 but this CPU or build lacks AVX2");
  return DEFAULT::kKernels;
}

void sgd_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    const at::Tensor& lr, const at::Tensor& momentum, double dampening, double weight_decay,
                    bool nesterov, bool maximize, bool first_step, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& rounding_seed) {
  check_params_and_grads(params, grads);
  const bool use_momentum = !momentum_buffers.empty();
  if (use_momentum) {
    check_same_layout(params, momentum_buffers, "momentum_buffers", /*same_dtype=*/true);
  }
  SgdHyper<double> hyper;
  const bool run = read_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, use_momentum,
                              grad_scale, found_inf, rounding_seed, params, hyper);
  if (first_step && !(run && hyper.use_momentum)) {
    // On a first step the buffers are outputs only (the optimizer allocates them uninitialised); where
    // the kernel will not write them - a skipped step, a momentum value of 0 - they become empty momentum.
    for (const at::Tensor& buf : momentum_buffers) {
      buf.zero_();
    }
  }
  if (run) {
    kernels().sgd_update(as_real(params), as_real(grads), as_real(momentum_buffers), hyper);
  }
}

void sgd8bit_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList codes,
                        at::TensorList absmax, const at::Tensor& lr, const at::Tensor& momentum, double dampening,
                        double weight_decay, bool nesterov, bool maximize, bool first_step,
                        const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                        const std::optional<at::Tensor>& rounding_seed, const std::optional<at::TensorList>& steps) {
  check_params_and_grads(params, grads);
  const std::vector<BlockLayout> layouts = check_codes_and_absmax(params, codes, absmax);
  check_step_counters(params, steps);
  SgdHyper<double> hyper;
  if (read_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, /*use_momentum=*/true,
                 grad_scale, found_inf, rounding_seed, params, hyper)) {
    kernels().sgd8bit_update(params, grads, codes, absmax, layouts, hyper);  // writes all state on a first step
    for (const at::Tensor& step : steps.value_or(at::TensorList())) {
      *step.data_ptr<float>() += 1.0f;
    }
  } else if (first_step) {  // skipped: the uninitialised state becomes empty momentum (see sgd_update_cpu)
    for (size_t i = 0; i < codes.size(); ++i) {
      codes[i].fill_(kZeroCode);
      absmax[i].zero_();
    }
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& values, bool per_row) {
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
  kernels().quantize_blockwise(values.contiguous(), codes, absmax, layout);
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax, at::ScalarType dtype) {
  TORCH_CHECK(codes.scalar_type() == at::kByte, "torchsgd8.dequantize_blockwise: codes must be uint8, got ",
              codes.scalar_type());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat, "torchsgd8.dequantize_blockwise: absmax must be float32, got ",
              absmax.scalar_type());
  const BlockLayout layout = absmax_layout(codes.sizes(), absmax, /*index=*/-1);
  TORCH_CHECK(is_supported_param_dtype(dtype),
              "torchsgd8.dequantize_blockwise: dtype must be float32, float64, bfloat16 or float16, got ", dtype);
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  kernels().dequantize_blockwise(codes.contiguous(), absmax.contiguous(), out, layout);
  return out;
}

}  // namespace

const KernelTable& kernels() {
  static const KernelTable& table = []() -> const KernelTable& {
    // every setting is read here, so an invalid one fails the first op whichever kernels would use it
    prefetch_ahead();
    gather_table_reads();
    return select_kernels();
  }();
  return table;
}

// Measured at 64M params in the 8-bit step: 20 % faster with 2 threads on an Intel Xeon (AVX-512 and AVX2
// kernels alike), no change on AMD Zen 1, and a similar scheme 17-20 % slower on AMD Zen 4; so on by vendor.
// The full-precision kernel prefetches too, for 16-bit params only (27 % faster at 16M bf16 params on the
// Intel Xeon; not measured on AMD).
bool prefetch_ahead() {
  static const bool enabled = switch_from_env("TORCHSGD8_CPU_PREFETCH", cpu_is_intel());
  return enabled;
}

// Measured with the AVX2 kernels on an Intel Xeon (gathers 3.6 TSC cycles per 8 lanes): the 8-bit step 25 %
// faster from L2 and 21 % from DRAM with gathers; on AMD Zen 1 (a gather ~18 cycles) scalar loads win 2:1.
bool gather_table_reads() {
  static const bool enabled = switch_from_env("TORCHSGD8_CPU_GATHER", intel_gathers_are_fast());
  return enabled;
}

TORCH_LIBRARY_IMPL(torchsgd8, CPU, m) {
  m.impl("sgd_update_", &sgd_update_cpu);
  m.impl("sgd8bit_update_", &sgd8bit_update_cpu);
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
}

}  // namespace torchsgd8::cpu
