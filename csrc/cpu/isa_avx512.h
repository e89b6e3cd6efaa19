// The AVX-512 kernel set (F, BW, DQ, VL and VBMI; CPU_CAPABILITY=AVX512): what it does its own way. Included
// by sgd_kernels.cpp only.
//
// bf16 params convert to and from float by VBMI byte permutes. The codec uses no gathers, which would cost
// about as much as the memory traffic of the 8-bit step:
//  * Dequantize 64 codes at once: the map is symmetric about code 127 (0.0), so byte p of the 128
//    magnitudes forms a 128-byte "plane", and VBMI's two-table byte permute looks up 64 bytes in it at once;
//    4 planes give 64 floats' bytes, interleaved back into floats by unpacks (the codes are pre-permuted so
//    the floats come out in order), with the sign set in the top byte.
//  * Quantize 16 lanes by arithmetic (SegmentQuantizer, from the kSegment* tables of quant.h): the count of
//    thresholds below |x| is linear inside a decade; lanes whose linear estimate lies within kSegmentNear
//    of an integer (about 1 in 4,000 random values) take the scalar nearest_code instead.
// Both keep their tables in registers and avoid work that costs a full 512-bit operation where a cheaper
// one does (AMD Zen 4 runs each as two 256-bit halves).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <bit>
#include <cmath>

#include "../quant.h"
#include "exact_quotient.h"
#include "simd.h"

namespace torchsgd8::cpu {
namespace CPU_CAPABILITY {
namespace {

// bf16 -> float is the 16 bits moved to the top of a 32-bit lane: one VBMI byte permute with zeroing per 16
// elements, where at::vec widens, shifts and extracts (5 vector ops per 32 elements instead of 2).
struct Bf16Spread {
  alignas(64) uint8_t index[2][64];  // [which 16 of the 32 elements][byte of the 16 floats]
};
constexpr Bf16Spread make_bf16_spread() {
  Bf16Spread spread{};
  for (int half = 0; half < 2; ++half) {
    for (int byte = 0; byte < 64; ++byte) {  // bytes 2, 3 of float k are bytes 0, 1 of element 16 half + k
      spread.index[half][byte] = byte % 4 >= 2 ? static_cast<uint8_t>(32 * half + 2 * (byte / 4) + byte % 2) : 0;
    }
  }
  return spread;
}
constexpr Bf16Spread kBf16Spread = make_bf16_spread();
constexpr __mmask64 kHighHalves = 0xCCCCCCCCCCCCCCCCull;  // bytes 2 and 3 of each 32-bit lane

inline void load_parts(const c10::BFloat16* ptr, Vectorized<float> (&v)[kParts]) {
  const __m512i raw = _mm512_loadu_si512(ptr);
  for (int half = 0; half < 2; ++half) {
    const __m512i index = _mm512_load_si512(kBf16Spread.index[half]);
    v[half] = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi8(kHighHalves, index, raw));
  }
}

// float -> bf16 rounded to nearest even, NaN -> 0xffff: at::vec's bits (checked for all 2^32 floats) in 10
// vector ops per 32 elements instead of its 16: the rounding bias is added under a mask of the odd results,
// and one VBMI two-table byte permute takes the high halves of both vectors, in order.
struct Bf16Pack {
  alignas(64) uint8_t index[64];  // byte j of the 32 bf16: byte j % 2 of the high half of float j / 2
};
constexpr Bf16Pack make_bf16_pack() {
  Bf16Pack pack{};
  for (int byte = 0; byte < 64; ++byte) {
    const int element = byte / 2;
    const int table = element / 16;  // v[0] or v[1]
    pack.index[byte] = static_cast<uint8_t>(64 * table + 4 * (element % 16) + 2 + byte % 2);
  }
  return pack;
}
constexpr Bf16Pack kBf16Pack = make_bf16_pack();

// The float bits plus the round-to-nearest-even bias: the bf16 is the high half (for non-NaN v).
C10_ALWAYS_INLINE __m512i bf16_rounding(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __mmask16 odd = _mm512_test_epi32_mask(bits, _mm512_set1_epi32(0x10000));  // ties round up to even
  const __m512i biased = _mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff));
  return _mm512_mask_add_epi32(biased, odd, biased, _mm512_set1_epi32(1));
}

inline void store_parts(c10::BFloat16* ptr, const Vectorized<float> (&v)[kParts]) {
  __m512i packed = _mm512_permutex2var_epi8(bf16_rounding(v[0]), _mm512_load_si512(kBf16Pack.index), bf16_rounding(v[1]));
  const __mmask16 nan_low = _mm512_cmp_ps_mask(v[0], v[0], _CMP_UNORD_Q);
  const __mmask16 nan_high = _mm512_cmp_ps_mask(v[1], v[1], _CMP_UNORD_Q);
  if ((nan_low | nan_high) != 0) [[unlikely]] {
    packed = _mm512_mask_mov_epi16(packed, _mm512_kunpackw(nan_high, nan_low), _mm512_set1_epi16(-1));
  }
  _mm512_storeu_si512(ptr, packed);
}

// The largest lane (AbsMax in sgd_kernels.cpp).
C10_ALWAYS_INLINE int32_t max_lane(const Vectorized<int32_t>& bits) {
  return _mm512_reduce_max_epi32(bits);
}

// The magnitude of code c is at index |int8(c ^ 127)| mod 128: c = 127 - m (m = 0..127) reads m, c = 128 + m
// reads m + 1, so index 0 holds 1.0 (code 255; code 127, 0.0, is masked to zero instead).
struct CodebookPlanes {
  alignas(64) uint8_t bytes[4][128];  // bytes[p][j] = byte p of the magnitude at index j
  alignas(64) uint8_t order[64];      // code order that makes the unpacks below yield elements in order
};

constexpr CodebookPlanes make_codebook_planes() {
  CodebookPlanes planes{};
  for (int j = 0; j < 128; ++j) {
    const float magnitude = kSignedDynamicMap[j == 0 ? 255 : kZeroCode + j];
    if (kSignedDynamicMap[kZeroCode - j] != (j == 0 ? 0.0f : -magnitude)) {
      throw "the map is not symmetric about code 127";  // fails the build
    }
    const auto bits = std::bit_cast<uint32_t>(magnitude);
    for (int p = 0; p < 4; ++p) {
      planes.bytes[p][j] = static_cast<uint8_t>(bits >> (8 * p));
    }
  }
  // Unpacking bytes to words to dwords works within 128-bit lanes: output vector q, lane l holds the bytes
  // at 16 l + 4 q + r (r < 4), and must hold element 16 q + 4 l + r.
  for (int l = 0; l < 4; ++l) {
    for (int q = 0; q < 4; ++q) {
      for (int r = 0; r < 4; ++r) {
        planes.order[16 * l + 4 * q + r] = static_cast<uint8_t>(16 * q + 4 * l + r);
      }
    }
  }
  return planes;
}

constexpr CodebookPlanes kCodebookPlanes = make_codebook_planes();

// quant.h's segment tables re-indexed for SegmentQuantizer: by "slot" = bits 24-28 of |x| (16 + the pair of
// binades, as |x| >= 2^-31 after flooring) with bit 4 cleared above the pair's split, so one two-register
// permute per table finds the segment's values without first finding the segment.
//
// Counts are in units of 2^-16 (kCountUnit) and offset by kNearUnits, so that rounding the estimate to an
// integer gives the count in bits 16-23 and "near an integer count" is one test of the low 16 bits.
static_assert(kCountUnit == 1 << 16, "count_byte below reads byte 2 of each lane");
static_assert(kNearUnits == static_cast<int32_t>(kSegmentNear * kCountUnit));

// The clamp to a decade segment's last count needs no table: that segment's offset is 8/9 of 2^k and its
// last count 2^(k+1) - 1, so kClampScale * offset + kClampBias is the last count plus one half (checked
// below); for the segments without slope (0.0, the first code, 1.0) it lies above their constant estimate.

struct SegmentSlots {
  alignas(64) float slope[32];
  alignas(64) float offset[32];
  alignas(64) uint8_t count_byte[64];  // byte 2 of each 32-bit lane: the integer count (< 256)
};

constexpr SegmentSlots make_segment_slots() {
  SegmentSlots slots{};
  for (int pair = 0; pair < 16; ++pair) {
    for (int above = 0; above < 2; ++above) {
      const int segment = kSegmentBelow[pair] + above;
      const int slot = above ? pair : 16 + pair;
      slots.slope[slot] = kSegmentSlope[segment] * kCountUnit;  // exact: powers of two
      slots.offset[slot] = kSegmentOffset[segment] * kCountUnit + kNearUnits;
      // the clamp (computed with one more rounding in the kernel) lands mid-way between counts
      const double clamp = static_cast<double>(kClampScale) * slots.offset[slot] + kClampBias;
      const double last_half = kSegmentLast[segment] * kCountUnit + kCountUnit / 2 + kNearUnits;
      if (kSegmentSlope[segment] != 0.0f ? (clamp < last_half - 64 || clamp > last_half + 64)
                                         : clamp < slots.offset[slot] + 64) {
        throw "kClampScale * offset + kClampBias is not the segment's last count";  // fails the build
      }
    }
  }
  for (int lane = 0; lane < 16; ++lane) {
    slots.count_byte[lane] = static_cast<uint8_t>(4 * lane + 2);
  }
  return slots;
}

constexpr SegmentSlots kSegmentSlots = make_segment_slots();

inline __mmask16 first_lanes16(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

// The AVX-512 quantizer: its tables and constants, loaded into registers once per call of Codec::quantize.
struct SegmentQuantizer {
  __m512i split = _mm512_loadu_si512(kSegmentSplit);
  __m512 slope[2] = {_mm512_load_ps(kSegmentSlots.slope), _mm512_load_ps(kSegmentSlots.slope + 16)};
  __m512 offset[2] = {_mm512_load_ps(kSegmentSlots.offset), _mm512_load_ps(kSegmentSlots.offset + 16)};
  __m512i count_byte = _mm512_load_si512(kSegmentSlots.count_byte);
  __m512 floor_magnitude = opaque(_mm512_castsi512_ps(_mm512_set1_epi32(kSegmentExponentBase << 23)));
  __m512i bit4 = opaque(_mm512_set1_epi32(16));
  __m512i near_bits = opaque(_mm512_set1_epi32(kCountUnit - 2 * kNearUnits));
  __m512 clamp_scale = opaque(_mm512_set1_ps(kClampScale));
  __m512 clamp_bias = opaque(_mm512_set1_ps(kClampBias));
  __m128i zero_code = opaque(_mm_set1_epi8(static_cast<char>(kZeroCode)));

  // v, hidden from the optimizer, which would otherwise rebuild constants from immediates inside the loop
  template <typename V>
  static V opaque(V v) {
    asm("" : "+v"(v));
    return v;
  }

  // codes with the lanes set in `near` replaced by the table lookup's (out of line: rarely needed).
  C10_NOINLINE static __m128i exact_near_lanes(__m512 x, __m128i codes, __mmask16 near) {
    alignas(64) float lanes[16];
    alignas(16) uint8_t result[16];
    _mm512_store_ps(lanes, x);
    _mm_store_si128(reinterpret_cast<__m128i*>(result), codes);
    for (int j = 0; j < 16; ++j) {
      if ((near >> j) & 1) {
        result[j] = nearest_code(lanes[j]);
      }
    }
    return _mm_load_si128(reinterpret_cast<const __m128i*>(result));
  }

  // Codes of 16 values x = v / absmax for a finite nonzero absmax (so |x| <= 1, never NaN).
  C10_ALWAYS_INLINE __m128i operator()(__m512 x) const {
    // |x|, raised to 2^-31 if smaller (all those count no thresholds): every lane's exponent is then in
    // [96, 127], where bits 24-28 of |x| are 16 + the pair of binades. (VRANGEPS: larger magnitude, sign 0.)
    const __m512i bits = _mm512_castps_si512(_mm512_range_ps(x, floor_magnitude, 0b1011));
    const __m512i pair = _mm512_srli_epi32(bits, 24);
    const __mmask16 above_split = _mm512_cmpgt_epi32_mask(bits, _mm512_permutexvar_epi32(pair, split));
    const __m512i slot = _mm512_mask_xor_epi32(pair, above_split, pair, bit4);
    // 2^16 times the segment's linear count, rounded to an integer: the count and its fraction in one lane.
    const __m512 offset_of_slot = _mm512_permutex2var_ps(offset[0], slot, offset[1]);
    const __m512 position =
        _mm512_fmadd_ps(_mm512_castsi512_ps(bits), _mm512_permutex2var_ps(slope[0], slot, slope[1]), offset_of_slot);
    const __m512i fixed = _mm512_cvt_roundps_epi32(_mm512_min_ps(position, _mm512_fmadd_ps(offset_of_slot, clamp_scale, clamp_bias)),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // Lanes within 4 / 2^16 of an integer count: the rounding of the estimate may have crossed it.
    const __mmask16 near = _mm512_testn_epi32_mask(fixed, near_bits);
    // The sign in bytes (a quarter of the work of 32-bit lanes): 127 + count, or 127 - count floored at 0.
    const __m128i count_bytes = _mm512_castsi512_si128(_mm512_permutexvar_epi8(count_byte, fixed));
    const __mmask16 negative = _mm512_movepi32_mask(_mm512_castps_si512(x));  // -0.0 gives 127 either way
    __m128i codes = _mm_mask_subs_epu8(_mm_add_epi8(count_bytes, zero_code), negative, zero_code, count_bytes);
    if (near != 0) [[unlikely]] {
      codes = exact_near_lanes(x, codes, near);
    }
    return codes;
  }
};

struct Codec {
  static constexpr int64_t kChunk = 64;  // elements decoded at once
  __m512i planes[4][2];                  // [byte][half of the 128-entry table]
  __m512i order;
  __m512i zero_code = _mm512_set1_epi8(static_cast<char>(kZeroCode));
  __m512i sign_bit = _mm512_set1_epi8(static_cast<char>(0x80));

  Codec() {
    for (int p = 0; p < 4; ++p) {
      for (int half = 0; half < 2; ++half) {
        planes[p][half] = _mm512_load_si512(kCodebookPlanes.bytes[p] + 64 * half);
      }
    }
    order = _mm512_load_si512(kCodebookPlanes.order);
  }

  // Codes 0..63 -> out[k] = elements 16 k .. 16 k + 15, times absmax.
  C10_ALWAYS_INLINE void decode_chunk(const __m512i raw_codes, float absmax, Vectorized<float> (&out)[4]) const {
    const __m512i codes = _mm512_permutexvar_epi8(order, raw_codes);
    const __m512i index = _mm512_abs_epi8(_mm512_xor_si512(codes, zero_code));
    const __mmask64 nonzero = _mm512_cmpneq_epi8_mask(codes, zero_code);
    const __mmask64 negative = _mm512_cmplt_epu8_mask(codes, zero_code);
    __m512i bytes[4];
    for (int p = 0; p < 4; ++p) {
      bytes[p] = _mm512_maskz_permutex2var_epi8(nonzero, planes[p][0], index, planes[p][1]);
    }
    bytes[3] = _mm512_mask_add_epi8(bytes[3], negative, bytes[3], sign_bit);  // top bits are 0: sets the sign
    const __m512i low01 = _mm512_unpacklo_epi8(bytes[0], bytes[1]);
    const __m512i high01 = _mm512_unpackhi_epi8(bytes[0], bytes[1]);
    const __m512i low23 = _mm512_unpacklo_epi8(bytes[2], bytes[3]);
    const __m512i high23 = _mm512_unpackhi_epi8(bytes[2], bytes[3]);
    const __m512 scale = _mm512_set1_ps(absmax);
    out[0] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(low01, low23)), scale);
    out[1] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(low01, low23)), scale);
    out[2] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(high01, high23)), scale);
    out[3] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(high01, high23)), scale);
  }
  C10_ALWAYS_INLINE void decode_chunk(const uint8_t* codes, float absmax, Vectorized<float> (&out)[4]) const {
    decode_chunk(_mm512_loadu_si512(codes), absmax, out);
  }

  void dequantize(const uint8_t* codes, float absmax, int64_t n, float* out) const {
    for (int64_t i = 0; i < n; i += kChunk) {
      const int64_t rest = std::min<int64_t>(n - i, kChunk);
      const __mmask64 bytes = rest == kChunk ? ~__mmask64(0) : (__mmask64(1) << rest) - 1;
      Vectorized<float> values[4];
      decode_chunk(_mm512_maskz_loadu_epi8(bytes, codes + i), absmax, values);
      for (int k = 0; k < 4; ++k) {
        _mm512_mask_storeu_ps(out + i + 16 * k, first_lanes16(rest - 16 * k), values[k]);  // no lanes past n
      }
    }
  }

  C10_ALWAYS_INLINE void quantize(const float* v, float absmax, int64_t n, uint8_t* codes) const {
    if (!std::isfinite(absmax)) [[unlikely]] {  // NaN or inf in the block: every x is 0 or NaN
      for (int64_t i = 0; i < n; ++i) {
        codes[i] = nearest_code(v[i] / absmax);
      }
      return;
    }
    if (ExactQuotient::applies(absmax)) {
      encode(v, n, codes, ExactQuotient(absmax));
    } else {
      encode(v, n, codes, [scale = _mm512_set1_ps(absmax)](__m512 value) { return _mm512_div_ps(value, scale); });
    }
  }

 private:
  // The codes of v[i] / absmax, each quotient computed by `divide`. Inlined by force: out of line, the call
  // would clobber every vector register, and the 8-bit step would reload its tables and constants around
  // each 64-element call.
  template <typename Divide>
  static C10_ALWAYS_INLINE void encode(const float* v, int64_t n, uint8_t* codes, const Divide& divide) {
    const SegmentQuantizer codes16;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i), codes16(divide(_mm512_loadu_ps(v + i))));
    }
    if (i < n) {
      const __mmask16 lanes = first_lanes16(n - i);
      _mm_mask_storeu_epi8(codes + i, lanes, codes16(divide(_mm512_maskz_loadu_ps(lanes, v + i))));
    }
  }
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace torchsgd8::cpu
