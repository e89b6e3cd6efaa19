// Which CPU kernels run: the kernel set (sgd_kernels.cpp, compiled once per instruction set) for this CPU's
// ISA, and the two tuning settings of the kernels. Each is chosen once per process, from the CPU unless an
// environment variable forces it; results are the same bits whichever is chosen.
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

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

// Gathers are fast on current Intel cores (about 3.6 cycles per 8 lanes), slower on Haswell and Broadwell,
// several times slower on Skylake to Ice Lake under the Gather Data Sampling ("Downfall") microcode, and
// microcoded on AMD up to Zen 2. AVX-VNNI (CPUID.(7,1):EAX[4]) marks the Intel cores since Alder Lake and
// Sapphire Rapids, none of which the mitigation slows.
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

// On for Intel CPUs, whose hardware prefetchers stop at page boundaries with the next page's walk still to
// come: prefetching a page ahead makes the 8-bit step (AVX-512 and AVX2 kernels) and the full-precision step
// of 16-bit params faster there. AMD CPUs are no faster with it (Zen 1) or slower (Zen 4).
bool prefetch_ahead() {
  static const bool enabled = switch_from_env("TORCHSGD8_CPU_PREFETCH", cpu_is_intel());
  return enabled;
}

// On where gathers are fast (intel_gathers_are_fast): there the AVX2 8-bit step's table reads by scalar
// loads would queue on one shuffle port; elsewhere the scalar loads are the faster.
bool gather_table_reads() {
  static const bool enabled = switch_from_env("TORCHSGD8_CPU_GATHER", intel_gathers_are_fast());
  return enabled;
}

}  // namespace torchsgd8::cpu
