// The AVX2 kernel set (AVX2, FMA and F16C; CPU_CAPABILITY=AVX2): what it does its own way. Included by
// sgd_kernels.cpp only.
//
// The codec divides by no vector and reads its tables with gathers only where gathers are fast. vpgatherdd
// is microcoded on AMD Zen 1/2 (about 18 cycles per 8 lanes) and vdivps takes about 6, which would make
// them most of the 8-bit step. Instead:
//  * table reads are scalar loads inserted into vectors: they run on the load units beside the arithmetic.
//    The inserts all need one shuffle port on Intel cores, whose gathers are fast (about 3.6 cycles per 8
//    lanes from Alder Lake and Sapphire Rapids on): there (gather_table_reads()) the two table reads are
//    gathers;
//  * v / absmax is computed exactly by multiplying with the reciprocal and one fma correction (ExactQuotient);
//  * the count of thresholds below |x| is one subtraction from a per-half-bucket bias (kHalfBucketBias);
//  * 32 codes are packed by byte shuffles and written at once.
#pragma once

#include <immintrin.h>

#include <array>
#include <cstring>

#include "../quant.h"
#include "exact_quotient.h"
#include "kernels.h"
#include "simd.h"

namespace torchsgd8::cpu {
namespace CPU_CAPABILITY {
namespace {

// The largest lane (AbsMax in sgd_kernels.cpp) by a shuffle tree: compilers turn a loop over the lanes into
// a chain of ~30 extracts and maxes.
C10_ALWAYS_INLINE int32_t max_lane(const Vectorized<int32_t>& bits) {
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(m);
}

// kBucketTable at half-bucket resolution (|x|'s float bits >> 16), folded into one bias per half bucket so
// that the count of thresholds below |x| is byte 2 of (bits(|x|) - bias): with the half bucket's base count
// b and threshold low bits t (if it has one), bias = ((half - b - 1) << 16) + t + 1, which leaves
// ((b + 1) << 16) + (low - t - 1) and so b + 1 exactly when low > t; without a threshold,
// bias = (half - b) << 16 leaves (b << 16) + low. Derived from kBucketTable when compiled.
constexpr int32_t kHalfBucketOffset = 2 * kBucketOffset;
constexpr int kNumHalfBuckets = 2 * (kNumBuckets - 1) + 1;  // the last bucket is only needed at 1.0

constexpr std::array<int32_t, kNumHalfBuckets> half_bucket_biases() {
  std::array<int32_t, kNumHalfBuckets> biases{};
  for (int h = 0; h < kNumHalfBuckets; ++h) {
    const uint32_t entry = static_cast<uint32_t>(kBucketTable[h / 2]);
    const uint32_t threshold = entry & kLowMask;
    const bool has_threshold = threshold != kLowMask;
    const bool threshold_in_upper_half = threshold >= (1u << 16);
    int32_t base = static_cast<int32_t>(entry >> kBucketShift);
    const int32_t half = kHalfBucketOffset + h;
    if (has_threshold && threshold_in_upper_half == (h % 2 == 1)) {
      biases[h] = ((half - base - 1) << 16) + static_cast<int32_t>(threshold & 0xffffu) + 1;
    } else {
      if (has_threshold && h % 2 == 1) {
        base += 1;  // the bucket's threshold lies in its lower half, below all of this one
      }
      biases[h] = (half - base) << 16;
    }
  }
  return biases;
}
inline constexpr std::array<int32_t, kNumHalfBuckets> kHalfBucketBias = half_bucket_biases();

// Shuffle indexes that move byte 2 of each dword of vector k to bytes 4k..4k+3 of its 128-bit lane (-1: zero).
struct CodeBytes {
  alignas(32) int8_t index[4][32];
};
constexpr CodeBytes code_bytes() {
  CodeBytes out{};
  for (int k = 0; k < 4; ++k) {
    for (int byte = 0; byte < 32; ++byte) {
      const int in_lane = byte % 16;
      out.index[k][byte] = in_lane / 4 == k ? static_cast<int8_t>(4 * (in_lane % 4) + 2) : int8_t{-1};
    }
  }
  return out;
}
inline constexpr CodeBytes kCodeBytes = code_bytes();

struct Codec {
  static constexpr int64_t kChunk = 2 * kStep<float>;  // 32: one quantize step (see quantize)
  bool gather = gather_table_reads();  // table reads by vpgatherdd instead of scalar loads (same values)

  // The codebook values of codes[0..8).
  C10_ALWAYS_INLINE __m256 lookup8(const uint8_t* codes) const {
    if (gather) {
      const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes));
      return _mm256_i32gather_ps(kSignedDynamicMap, _mm256_cvtepu8_epi32(eight), sizeof(float));
    }
    uint64_t w;
    std::memcpy(&w, codes, sizeof(w));
    const float* map = kSignedDynamicMap;
    const __m128 lo = _mm_setr_ps(map[w & 255], map[(w >> 8) & 255], map[(w >> 16) & 255], map[(w >> 24) & 255]);
    const __m128 hi = _mm_setr_ps(map[(w >> 32) & 255], map[(w >> 40) & 255], map[(w >> 48) & 255], map[w >> 56]);
    return _mm256_set_m128(hi, lo);
  }

  void decode_chunk(const uint8_t* codes, float absmax, Vectorized<float> (&out)[kChunk / 8]) const {
    const __m256 scale = _mm256_set1_ps(absmax);
    for (int k = 0; k < kChunk / 8; ++k) {
      out[k] = Vectorized<float>(_mm256_mul_ps(lookup8(codes + 8 * k), scale));
    }
  }

  void dequantize(const uint8_t* codes, float absmax, int64_t n, float* out) const {
    int64_t i = 0;
    const __m256 scale = _mm256_set1_ps(absmax);
    for (; i + 8 <= n; i += 8) {
      _mm256_storeu_ps(out + i, _mm256_mul_ps(lookup8(codes + i), scale));
    }
    for (; i < n; ++i) {
      out[i] = dequantize_value(codes[i], absmax);
    }
  }

  // Code << 16 of 8 lanes of quotients x (|x| <= 1).
  C10_ALWAYS_INLINE __m256i shifted_codes8(__m256i x) const {
    // |x|'s bits, raised to the first half bucket (everything below it has count 0)
    const __m256i bits = _mm256_max_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff)),
                                          _mm256_set1_epi32(kHalfBucketOffset << 16));
    // the 8 biases, indexed by the half bucket bits >> 16
    const int32_t* bias = kHalfBucketBias.data() - kHalfBucketOffset;
    __m256i biases;
    if (gather) {
      biases = _mm256_i32gather_epi32(bias, _mm256_srli_epi32(bits, 16), sizeof(int32_t));
    } else {  // scalar loads: the indexes come out two per 64-bit lane
      const __m128i lo = _mm256_castsi256_si128(bits);
      const __m128i hi = _mm256_extracti128_si256(bits, 1);
      const uint64_t pairs[4] = {static_cast<uint64_t>(_mm_cvtsi128_si64(lo)), static_cast<uint64_t>(_mm_extract_epi64(lo, 1)),
                                 static_cast<uint64_t>(_mm_cvtsi128_si64(hi)), static_cast<uint64_t>(_mm_extract_epi64(hi, 1))};
      biases = _mm256_setr_epi32(
          bias[static_cast<uint32_t>(pairs[0]) >> 16], bias[pairs[0] >> 48], bias[static_cast<uint32_t>(pairs[1]) >> 16],
          bias[pairs[1] >> 48], bias[static_cast<uint32_t>(pairs[2]) >> 16], bias[pairs[2] >> 48],
          bias[static_cast<uint32_t>(pairs[3]) >> 16], bias[pairs[3] >> 48]);
    }
    const __m256i count = _mm256_and_si256(_mm256_sub_epi32(bits, biases), _mm256_set1_epi32(0x00ff0000));
    // 127 + count, or 127 - count for negative x (sign_epi32 also zeroes count where x is +-0, whose count is 0);
    // -1.0 gives 127 - 128, clamped to code 0 like nearest_code's min(c, 127)
    const __m256i code = _mm256_add_epi32(_mm256_sign_epi32(count, x), _mm256_set1_epi32(kZeroCode << 16));
    return _mm256_max_epi32(code, _mm256_setzero_si256());
  }

  // Writes the codes (byte 2 of each lane) of 4 vectors of 8 lanes, in order.
  static C10_ALWAYS_INLINE void store_codes32(const __m256i (&shifted)[4], uint8_t* codes) {
    __m256i packed = _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k) {
      const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kCodeBytes.index[k]));
      packed = _mm256_or_si256(packed, _mm256_shuffle_epi8(shifted[k], index));
    }
    // dwords now hold codes [0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, 20-23, 28-31]
    packed = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes), packed);
  }

  void quantize(const float* v, float absmax, int64_t n, uint8_t* codes) const {
    int64_t i = 0;
    if (ExactQuotient::applies(absmax)) {
      const ExactQuotient quotient(absmax);
      for (; i + 32 <= n; i += 32) {
        __m256i shifted[4];
        for (int k = 0; k < 4; ++k) {
          shifted[k] = shifted_codes8(_mm256_castps_si256(quotient(Vectorized<float>::loadu(v + i + 8 * k))));
        }
        store_codes32(shifted, codes + i);
      }
    }
    for (; i < n; ++i) {
      codes[i] = nearest_code(v[i] / absmax);
    }
  }
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace torchsgd8::cpu
