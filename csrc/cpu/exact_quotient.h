// The IEEE quotient v / absmax without dividing, for the SIMD quantizers of the AVX2 and AVX-512 kernel sets
// (their fmadd is fused; the portable at::vec::fmadd rounds twice, so the portable set divides). Included by
// those kernel sets' headers only.
#pragma once

#include "simd.h"

namespace torchsgd8::cpu {
namespace CPU_CAPABILITY {
namespace {

// Markstein's method: vdivps costs 6-10 cycles per vector where a multiply costs 0.5-1. q = v * inverse is
// within an ulp of the quotient, the remainder v - q * absmax is exact in one fma, and q + remainder * inverse
// rounds to the quotient, given inverse = 1 / absmax correctly rounded and an exact remainder: true for absmax
// in [2^-64, 2^64) (applies()) wherever |v / absmax| >= 2^-39 (the remainder is then a multiple of 2^-149);
// smaller quotients, off by at most an ulp, all have code 127 either way.
struct ExactQuotient {
  Vectorized<float> negative_absmax;
  Vectorized<float> inverse;

  static bool applies(float absmax) { return absmax >= 0x1p-64f && absmax < 0x1p64f; }  // false for NaN, inf
  explicit ExactQuotient(float absmax) : negative_absmax(-absmax), inverse(1.0f / absmax) {}

  C10_ALWAYS_INLINE Vectorized<float> operator()(const Vectorized<float>& v) const {
    const Vectorized<float> q = v * inverse;
    return at::vec::fmadd(at::vec::fmadd(q, negative_absmax, v), inverse, q);
  }
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace torchsgd8::cpu
