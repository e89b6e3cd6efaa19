// Vector building blocks of the CPU kernels, the same for every kernel set: how many elements one SIMD step
// covers, loading and storing them as vectors of the accumulation type, software prefetch. Included by
// sgd_kernels.cpp only (once per instruction set: see there), so everything here is internal to that copy.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <tuple>
#include <type_traits>

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

namespace torchsgd8::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// SIMD lanes: kParts vectors of acc_t per step. bf16/fp16 load as two float vectors, so one step is
// always kParts * Vectorized<acc_t>::size() elements of any storage type.
constexpr int kParts = 2;
template <typename acc_t>
constexpr int64_t kStep = kParts * Vectorized<acc_t>::size();

// One step of elements of storage type T as acc_t vectors. A kernel set may overload these for a type it
// converts its own way (isa_avx512.h: bf16).
template <typename T, typename acc_t>
inline void load_parts(const T* ptr, Vectorized<acc_t> (&v)[kParts]) {
  if constexpr (std::is_same_v<T, acc_t>) {
    v[0] = Vectorized<acc_t>::loadu(ptr);
    v[1] = Vectorized<acc_t>::loadu(ptr + Vectorized<acc_t>::size());
  } else {
    static_assert(Vectorized<T>::size() == 2 * Vectorized<float>::size());
    std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(ptr));
  }
}

template <typename T, typename acc_t>
inline void store_parts(T* ptr, const Vectorized<acc_t> (&v)[kParts]) {
  if constexpr (std::is_same_v<T, acc_t>) {
    v[0].store(ptr);
    v[1].store(ptr + Vectorized<acc_t>::size());
  } else {
    at::vec::convert_from_float<T>(v[0], v[1]).store(ptr);
  }
}

// Software prefetch of the line `bytes` past p. The address is computed as an integer: it may lie past the
// end of the tensor (prefetch never faults).
C10_ALWAYS_INLINE void prefetch_past(const void* p, uintptr_t bytes) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + bytes));
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace torchsgd8::cpu
