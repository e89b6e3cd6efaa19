// The portable kernel set (CPU_CAPABILITY=DEFAULT): what it does its own way. at::vec's portable Vectorized
// is plain arrays, so the codec works element by element with the scalar rules of quant.h. Included by
// sgd_kernels.cpp only.
#pragma once

#include <algorithm>
#include <cmath>

#include "../quant.h"
#include "../sgd_rule.h"
#include "simd.h"

namespace torchsgd8 {
// The portable at::vec::fmadd rounds twice; the rule promises torch's single rounding (and the same bits
// as the scalar tails), so fuse lane by lane.
template <typename T>
struct FusedMultiplyAdd<at::vec::Vectorized<T>> {
  using Vec = at::vec::Vectorized<T>;
  static Vec apply(const Vec& a, const Vec& b, const Vec& c) {
    T x[Vec::size()], y[Vec::size()], z[Vec::size()];
    a.store(x);
    b.store(y);
    c.store(z);
    for (int i = 0; i < Vec::size(); ++i) {
      x[i] = std::fma(x[i], y[i], z[i]);
    }
    return Vec::loadu(x);
  }
};
}  // namespace torchsgd8

namespace torchsgd8::cpu {
namespace CPU_CAPABILITY {
namespace {

// The largest lane (AbsMax in sgd_kernels.cpp; all lanes are >= 0).
C10_ALWAYS_INLINE int32_t max_lane(const Vectorized<int32_t>& bits) {
  int32_t lanes[Vectorized<int32_t>::size()];
  bits.store(lanes);
  int32_t result = 0;
  for (int32_t lane : lanes) {
    result = std::max(result, lane);
  }
  return result;
}

struct Codec {
  static constexpr int64_t kChunk = kStep<float>;

  // kParts float vectors of dequantized codes (one step of the SIMD loops).
  void decode_chunk(const uint8_t* codes, float absmax, Vectorized<float> (&out)[kParts]) const {
    alignas(64) float values[kChunk];
    dequantize(codes, absmax, kChunk, values);
    for (int k = 0; k < kParts; ++k) {
      out[k] = Vectorized<float>::loadu(values + k * Vectorized<float>::size());
    }
  }

  void dequantize(const uint8_t* codes, float absmax, int64_t n, float* out) const {
    for (int64_t i = 0; i < n; ++i) {
      out[i] = dequantize_value(codes[i], absmax);
    }
  }

  void quantize(const float* v, float absmax, int64_t n, uint8_t* codes) const {
    for (int64_t i = 0; i < n; ++i) {
      codes[i] = nearest_code(v[i] / absmax);
    }
  }
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace torchsgd8::cpu
