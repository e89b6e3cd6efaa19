// CPU kernels, compiled once per instruction set: CPU_CAPABILITY names the copy (DEFAULT, AVX2, AVX512) and
// selects at::vec's implementation, exactly as ATen builds its own kernels.
//
// Work is split between threads by elements across all tensors of a call, at the boundaries of the (up to)
// 256-element blocks, so one at::parallel_for covers a whole param group however many small tensors it has,
// and no block is ever shared by two threads (results do not depend on the thread count). Each block is one
// pass over memory; the 8-bit kernel keeps the block's new buffer in a 1 KiB stack array until its codes
// are written.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

#include "../quant.h"
#include "../sgd_rule.h"
#include "kernels.h"

#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY DEFAULT
#endif

#if !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
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
#endif

namespace torchsgd8::cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// Runs fn(tensor_index, first_block, end_block) over ranges of consecutive blocks that together cover every
// block of every tensor (tensor t: numels[t] elements laid out as layouts[t]), in one parallel region for
// all tensors. The work is split by elements, not blocks (per-row layouts have short blocks at row ends), and
// each block goes whole to the range that holds its first element: no block is ever shared by two threads.
template <typename Fn>
void parallel_over_blocks(c10::ArrayRef<int64_t> numels, c10::ArrayRef<BlockLayout> layouts, const Fn& fn) {
  std::vector<int64_t> first_element(numels.size() + 1, 0);
  for (const auto i : c10::irange(numels.size())) {
    first_element[i + 1] = first_element[i] + numels[i];
  }
  at::parallel_for(0, first_element.back(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(first_element.begin(), first_element.end(), begin) - first_element.begin() - 1;
    for (; t < numels.size() && first_element[t] < end; ++t) {
      const int64_t first = layouts[t].first_block_from(std::max<int64_t>(begin - first_element[t], 0));
      const int64_t last = layouts[t].first_block_from(std::min(end - first_element[t], numels[t]));
      if (first < last) {
        fn(t, first, last);
      }
    }
  });
}

// Runs fn(block, start, size) for every block of one tensor of `numel` elements laid out as `layout`.
template <typename Fn>
void parallel_for_each_block(int64_t numel, BlockLayout layout, const Fn& fn) {
  parallel_over_blocks(numel, layout, [&](size_t, int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      fn(block, layout.start(block), layout.size(block));
    }
  });
}

std::vector<int64_t> numels_of(at::TensorList tensors) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    numels.push_back(t.numel());
  }
  return numels;
}

std::vector<BlockLayout> flat_layouts(at::TensorList tensors) {
  std::vector<BlockLayout> layouts;
  layouts.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    layouts.push_back(BlockLayout::rows_of(t.numel()));
  }
  return layouts;
}

// SIMD lanes: kParts vectors of acc_t per step. bf16/fp16 load as two float vectors, so one step is
// always kParts * Vectorized<acc_t>::size() elements of any storage type.
constexpr int kParts = 2;
template <typename acc_t>
constexpr int64_t kStep = kParts * Vectorized<acc_t>::size();

// The hyperparameters as the SIMD loops use them: broadcast into vectors once per range when the rule's
// options are fixed (MomentumOptions), so the loop holds them in registers; as they are otherwise (the
// RuntimeOptions rule tests weight_decay != 0, which needs the scalar).
template <typename acc_t, typename Options>
auto hyper_for_vectors(const SgdHyper<acc_t>& h, Options) {
  if constexpr (std::is_same_v<Options, RuntimeOptions>) {
    return h;
  } else {
    using Vec = Vectorized<acc_t>;
    return SgdHyper<Vec>{Vec(h.lr),         Vec(h.momentum), Vec(h.dampening_complement), Vec(h.weight_decay),
                         Vec(h.grad_scale), h.unscale,       h.use_momentum,              h.first_step,
                         h.nesterov,        h.maximize,      h.stochastic_rounding,       h.rounding_seed};
  }
}

#if defined(CPU_CAPABILITY_AVX512)
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
#endif

template <typename T, typename acc_t>
inline void load_parts(const T* ptr, Vectorized<acc_t> (&v)[kParts]) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i raw = _mm512_loadu_si512(ptr);
    for (int half = 0; half < 2; ++half) {
      const __m512i index = _mm512_load_si512(kBf16Spread.index[half]);
      v[half] = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi8(kHighHalves, index, raw));
    }
    return;
  }
#endif
  if constexpr (std::is_same_v<T, acc_t>) {
    v[0] = Vectorized<acc_t>::loadu(ptr);
    v[1] = Vectorized<acc_t>::loadu(ptr + Vectorized<acc_t>::size());
  } else {
    static_assert(Vectorized<T>::size() == 2 * Vectorized<float>::size());
    std::tie(v[0], v[1]) = at::vec::convert_to_float<T>(Vectorized<T>::loadu(ptr));
  }
}

#if defined(CPU_CAPABILITY_AVX512)
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
#endif

template <typename T, typename acc_t>
inline void store_parts(T* ptr, const Vectorized<acc_t> (&v)[kParts]) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    __m512i packed = _mm512_permutex2var_epi8(bf16_rounding(v[0]), _mm512_load_si512(kBf16Pack.index), bf16_rounding(v[1]));
    const __mmask16 nan_low = _mm512_cmp_ps_mask(v[0], v[0], _CMP_UNORD_Q);
    const __mmask16 nan_high = _mm512_cmp_ps_mask(v[1], v[1], _CMP_UNORD_Q);
    if ((nan_low | nan_high) != 0) [[unlikely]] {
      packed = _mm512_mask_mov_epi16(packed, _mm512_kunpackw(nan_high, nan_low), _mm512_set1_epi16(-1));
    }
    _mm512_storeu_si512(ptr, packed);
    return;
  }
#endif
  if constexpr (std::is_same_v<T, acc_t>) {
    v[0].store(ptr);
    v[1].store(ptr + Vectorized<acc_t>::size());
  } else {
    at::vec::convert_from_float<T>(v[0], v[1]).store(ptr);
  }
}

// update_range (below) for bf16 params with stochastic rounding: scalar, as it is an opt-in mode.
// `tensor` and `first_index` locate the elements for the counter-based noise.
template <typename B>
void update_range_stochastic(c10::BFloat16* param, const c10::BFloat16* grad, B* buf, int64_t n,
                             const SgdHyper<float>& h, uint32_t tensor, int64_t first_index) {
  const bool read_buf = h.use_momentum && !h.first_step;
  for (int64_t i = 0; i < n; ++i) {
    float b = read_buf ? static_cast<float>(buf[i]) : 0.0f;
    const float p = sgd_rule(static_cast<float>(param[i]), static_cast<float>(grad[i]), b, h);
    const uint32_t noise = rounding_noise(h.rounding_seed, tensor, static_cast<uint64_t>(first_index + i));
    param[i] = c10::BFloat16(stochastic_round_bf16_bits(p, noise), c10::BFloat16::from_bits());
    if (h.use_momentum) {
      buf[i] = static_cast<B>(b);
    }
  }
}

// Software prefetch of the line `bytes` past p. The address is computed as an integer: it may lie past the
// end of the tensor (prefetch never faults).
C10_ALWAYS_INLINE void prefetch_past(const void* p, uintptr_t bytes) {
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(p) + bytes));
}

// The full-precision kernel prefetches one 4 KiB page ahead for 16-bit params, where one SIMD step covers a
// single cache line of each stream: on an Intel Xeon, 16M bf16 params took 5.56 -> 4.05 ms with 2 threads
// (10.4 -> 7.4 ms with one), fp16 alike; for fp32 params (two lines a step) it made the step slower.
constexpr uintptr_t kPrefetchBytes16 = 4096;

// param[i], buf[i] <- sgd_rule(param[i], grad[i], buf[i]) for i < n. B is the buffer's storage type: the
// param's dtype for the fp32-precision op, float for the 8-bit op's dequantized block. `prefetch`: see
// kPrefetchBytes16 (only 16-bit params prefetch).
template <typename T, typename B, typename acc_t>
void update_range(T* param, const T* grad, B* buf, int64_t n, const SgdHyper<acc_t>& hyper, uint32_t tensor,
                  int64_t first_index, bool prefetch) {
  // A local copy: stores through param/buf could alias a referenced struct's fields, which would force
  // the compiler to reload every hyperparameter and re-test every flag per element.
  const SgdHyper<acc_t> h = hyper;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (h.stochastic_rounding) {
      update_range_stochastic(param, grad, buf, n, h, tensor, first_index);
      return;
    }
  }
  const bool read_buf = h.use_momentum && !h.first_step;
  int64_t i = 0;
  with_rule_options(h, [&](auto options) {
    using Options = decltype(options);
    const auto rule_hyper = hyper_for_vectors(h, options);
    for (; i + kStep<acc_t> <= n; i += kStep<acc_t>) {
      if constexpr (sizeof(T) == 2) {
        if (prefetch) {
          prefetch_past(param + i, kPrefetchBytes16);
          prefetch_past(grad + i, kPrefetchBytes16);
          if (Options::use_momentum(h)) {
            prefetch_past(buf + i, kPrefetchBytes16);
          }
        }
      }
      Vectorized<acc_t> p[kParts], g[kParts], b[kParts];
      load_parts(param + i, p);
      load_parts(grad + i, g);
      if (Options::use_momentum(h) && !Options::first_step(h)) {
        load_parts(buf + i, b);
      }
      for (int k = 0; k < kParts; ++k) {
        p[k] = sgd_rule(p[k], g[k], b[k], rule_hyper, options);
      }
      store_parts(param + i, p);
      if (Options::use_momentum(h)) {
        store_parts(buf + i, b);
      }
    }
  });
  for (; i < n; ++i) {
    acc_t b = read_buf ? static_cast<acc_t>(buf[i]) : acc_t(0);
    param[i] = static_cast<T>(sgd_rule(static_cast<acc_t>(param[i]), static_cast<acc_t>(grad[i]), b, h));
    if (h.use_momentum) {
      buf[i] = static_cast<B>(b);
    }
  }
}

// Running max of |v| over float vectors, NaN-propagating. |v|'s bits (sign cleared) order as integers like
// the values, with every NaN above +inf, so one integer max per vector needs no NaN test.
struct AbsMax {
  Vectorized<int32_t> bits = Vectorized<int32_t>(0);

  void add(const Vectorized<float>& v) {
    bits = at::vec::maximum(bits, at::vec::cast<int32_t>(v) & Vectorized<int32_t>(0x7fffffff));
  }
  // The max over lanes; NaN (canonical) if any lane saw one.
  float value() const {
#if defined(CPU_CAPABILITY_AVX512)
    const int32_t result = _mm512_reduce_max_epi32(bits);
#elif defined(CPU_CAPABILITY_AVX2)
    // a shuffle tree: compilers turn the lane loop below into a chain of ~30 extracts and maxes
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, _MM_SHUFFLE(2, 3, 0, 1)));
    const int32_t result = _mm_cvtsi128_si32(m);
#else
    int32_t lanes[Vectorized<int32_t>::size()];
    bits.store(lanes);
    int32_t result = 0;
    for (int32_t lane : lanes) {
      result = std::max(result, lane);
    }
#endif
    return canonical_nan(c10::bit_cast<float>(result));
  }
};

// NaN-propagating max |v| of a float block.
inline float block_absmax(const float* v, int64_t n) {
  using Vec = Vectorized<float>;
  int64_t i = 0;
  AbsMax running;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    running.add(Vec::loadu(v + i));
  }
  float result = running.value();
  for (; i < n; ++i) {
    result = absmax_accumulate(result, v[i]);
  }
  return canonical_nan(result);
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The IEEE quotient v / absmax without dividing (Markstein), for the SIMD quantizers: vdivps costs 6-10
// cycles per vector where a multiply costs 0.5-1. q = v * inverse is within an ulp of the quotient, the
// remainder v - q * absmax is exact in one fma, and q + remainder * inverse rounds to the quotient, given
// inverse = 1 / absmax correctly rounded and an exact remainder: true for absmax in [2^-64, 2^64) (applies())
// wherever |v / absmax| >= 2^-39 (the remainder is then a multiple of 2^-149); smaller quotients, off by at
// most an ulp, all have code 127 either way.
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
#endif

// ---- Codec: 8-bit (de)quantization of one block, per instruction set ----
// A Codec holds what its ISA keeps in registers while (de)quantizing; one is built per parallel range.
// Every variant gives the same bits: the codebook value times absmax (one rounding) to dequantize, the
// exact nearest code of v / absmax (IEEE division) to quantize.

#if defined(CPU_CAPABILITY_AVX512)
// AVX-512 (F, BW, DQ, VL and VBMI): no gathers, which cost about as much as the memory traffic here.
//  * Dequantize 64 codes at once: the map is symmetric about code 127 (0.0), so byte p of the 128
//    magnitudes forms a 128-byte "plane", and VBMI's two-table byte permute looks up 64 bytes in it at once;
//    4 planes give 64 floats' bytes, interleaved back into floats by unpacks (the codes are pre-permuted so
//    the floats come out in order), with the sign set in the top byte.
//  * Quantize 16 lanes by arithmetic (SegmentQuantizer, from the kSegment* tables of quant.h): the count of
//    thresholds below |x| is linear inside a decade; lanes whose linear estimate lies within kSegmentNear
//    of an integer (about 1 in 4,000 random values) take the scalar nearest_code instead.
// Both keep their tables in registers and avoid work that costs a full 512-bit operation where a cheaper
// one does (Zen 4 runs each as two 256-bit halves): about 26 cycles per 16 elements for the whole step on
// Zen 4 (with the division ExactQuotient now replaces; on an Intel Xeon that change took 18.4 -> 17.3 TSC
// cycles per 16 elements from L2).

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
  // The codes of v[i] / absmax, each quotient computed by `divide`. Inlined by force: GCC compiled it (as a
  // generic lambda) out of line in the library, and since a call clobbers every vector register, the 8-bit
  // step then spilled and reloaded its tables and constants around each 64-element call: 1.4 instead of
  // 1.15 TSC cycles per element (fp32 params, one core, 1M params), 1.65 instead of 1.33 for bf16.
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

#elif defined(CPU_CAPABILITY_AVX2)
// AVX2 without divisions, and without gathers where they are slow. Where vpgatherdd is microcoded (AMD Zen
// 1/2: ~18 cycles per 8 lanes) and vdivps slow (~6), those two were most of the step. Instead:
//  * table reads are scalar loads inserted into vectors: they run on the load units beside the arithmetic;
//    but the inserts all need one shuffle port on Intel cores, where a gather costs ~3.6 TSC cycles per 8
//    lanes: there (gather_table_reads()) the two table reads are gathers, 21 % faster from DRAM;
//  * v / absmax is computed exactly by multiplying with the reciprocal and one fma correction (ExactQuotient);
//  * the count of thresholds below |x| is one subtraction from a per-half-bucket bias (kHalfBucketBias);
//  * 32 codes are packed by byte shuffles and written at once.
// The whole step from L2: about 4.7 TSC cycles (2.0 GHz) per element on Zen 1, against 6.8 with gathers; on
// an Intel Xeon 2.25 TSC cycles (2.6 GHz) with scalar loads, 1.6-1.7 with gathers.

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

#else  // DEFAULT

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

#endif

constexpr int kChunkVectors = Codec::kChunk / Vectorized<float>::size();
static_assert(kChunkVectors % kParts == 0);

// Codes of a block whose absmax is already known.
C10_ALWAYS_INLINE void quantize_with_absmax(const Codec& codec, const float* v, int64_t n, float absmax, uint8_t* codes) {
  if (absmax == 0.0f) {
    std::fill(codes, codes + n, kZeroCode);
    return;
  }
  codec.quantize(v, absmax, n, codes);
}

inline void quantize_block(const Codec& codec, const float* v, int64_t n, uint8_t* codes, float* absmax) {
  *absmax = block_absmax(v, n);
  quantize_with_absmax(codec, v, n, *absmax, codes);
}

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

void sgd_update(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                const SgdHyper<double>& hyper) {
  if (params.empty()) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "sgd_update_", [&] {
    using acc_t = acc_type<scalar_t>;
    const SgdHyper<acc_t> h = cast_hyper<acc_t>(hyper);
    const bool prefetch = prefetch_ahead();
    // blocks only split the work here: each range is contiguous elements
    parallel_over_blocks(numels_of(params), flat_layouts(params), [&](size_t t, int64_t first, int64_t last) {
      const int64_t begin = first * kBlockSize;
      const int64_t end = std::min(last * kBlockSize, params[t].numel());
      scalar_t* buf = h.use_momentum ? momentum_buffers[t].data_ptr<scalar_t>() + begin : nullptr;
      update_range(params[t].data_ptr<scalar_t>() + begin, grads[t].const_data_ptr<scalar_t>() + begin, buf,
                   end - begin, h, static_cast<uint32_t>(t), begin, prefetch);
    });
  });
}

// The 8-bit step for Codec::kChunk elements: decode the old buffer, apply the rule, store the params and
// the new buffer (float) into `buf`, and with kTrack fold |buf| into `running`.
template <bool kTrack, typename T, typename Hyper, typename Options>
C10_ALWAYS_INLINE void update_chunk_8bit(T* param, const T* grad, const uint8_t* code, float* buf, float old_absmax,
                              const Hyper& h, Options options, const Codec& codec, AbsMax& running) {
  Vectorized<float> b[kChunkVectors];
  if (Options::first_step(h)) {
    std::fill(b, b + kChunkVectors, Vectorized<float>(0.0f));  // stays 0 when the momentum value is 0
  } else {
    codec.decode_chunk(code, old_absmax, b);
  }
  for (int j = 0; j < kChunkVectors; j += kParts) {
    const int64_t offset = j * Vectorized<float>::size();
    Vectorized<float> p[kParts], g[kParts];
    load_parts(param + offset, p);
    load_parts(grad + offset, g);
    for (int k = 0; k < kParts; ++k) {
      p[k] = sgd_rule(p[k], g[k], b[j + k], h, options);
      if constexpr (kTrack) {
        running.add(b[j + k]);
      }
      b[j + k].store(buf + offset + k * Vectorized<float>::size());
    }
    store_parts(param + offset, p);
  }
}

// Software prefetch of the chunk kPrefetchAhead elements ahead in each stream (params, grads, codes): one
// 4 KiB page of float params, so the next page's walk and first misses start while this one is worked on;
// the hardware prefetchers stop at page boundaries. Only where prefetch_ahead() says it pays (see there).
constexpr int64_t kPrefetchAhead = 1024;

template <typename T>
C10_ALWAYS_INLINE void prefetch_chunk(const T* param, const T* grad, const uint8_t* code) {
  constexpr uintptr_t kLine = 64;
  for (uintptr_t line = 0; line < Codec::kChunk * sizeof(T); line += kLine) {
    prefetch_past(param, kPrefetchAhead * sizeof(T) + line);
    prefetch_past(grad, kPrefetchAhead * sizeof(T) + line);
  }
  static_assert(Codec::kChunk <= kLine);
  prefetch_past(code, kPrefetchAhead);
}

// A block whose new buffer is computed (in a stack array) but not yet quantized.
struct PendingCodes {
  const float* buf = nullptr;
  uint8_t* code = nullptr;
  int64_t size = 0;
  int64_t done = 0;  // codes written so far
  float absmax = 0.0f;

  // Writes up to `count` more codes.
  C10_ALWAYS_INLINE void quantize_next(const Codec& codec, int64_t count) {
    count = std::min(count, size - done);
    if (count > 0) {
      quantize_with_absmax(codec, buf + done, count, absmax, code + done);
      done += count;
    }
  }
};

// The 8-bit step over blocks [first, last) of one tensor. Per block: chunks of the rule straight from
// memory (the last partial chunk through zero-padded stack copies) into a 1 KiB stack buffer, then the new
// absmax, then the codes. Quantizing is pure arithmetic on L1 data and the rule is memory-bound, so the
// codes of each block are computed one block later, chunk by chunk between the next block's chunks: the
// core then has the next block's loads in flight while it quantizes (results are the same as block by block).
template <typename T>
void update_blocks_8bit(T* param, const T* grad, uint8_t* code, float* absmax, BlockLayout layout, int64_t first,
                        int64_t last, const SgdHyper<float>& hyper, uint32_t tensor, const Codec& codec,
                        bool prefetch) {
  alignas(64) float bufs[2][kBlockSize];
  const SgdHyper<float> h = hyper;  // local copy: see update_range
  if (h.stochastic_rounding) {  // bf16 only: the rule runs in the scalar stochastic-rounding loop, block by block
    for (int64_t block = first; block < last; ++block) {
      const int64_t start = layout.start(block);
      const int64_t n = layout.size(block);
      if (h.first_step) {
        std::fill(bufs[0], bufs[0] + n, 0.0f);  // stays 0 when the momentum value is 0 (the rule leaves it alone)
      } else {
        codec.dequantize(code + start, absmax[block], n, bufs[0]);
      }
      update_range(param + start, grad + start, bufs[0], n, h, tensor, start, /*prefetch=*/false);
      quantize_block(codec, bufs[0], n, code + start, absmax + block);
    }
    return;
  }
  with_rule_options(h, [&](auto options) {
    const auto rule_hyper = hyper_for_vectors(h, options);
    PendingCodes pending;
    for (int64_t block = first; block < last; ++block) {
      const int64_t start = layout.start(block);
      const int64_t n = layout.size(block);
      float* buf = bufs[block & 1];
      const float old_absmax = absmax[block];
      AbsMax running;
      int64_t i = 0;
      for (; i + Codec::kChunk <= n; i += Codec::kChunk) {
        if (prefetch) {
          prefetch_chunk(param + start + i, grad + start + i, code + start + i);
        }
        update_chunk_8bit<true>(param + start + i, grad + start + i, code + start + i, buf + i, old_absmax,
                                rule_hyper, options, codec, running);
        pending.quantize_next(codec, Codec::kChunk);
      }
      float new_absmax = running.value();
      if (i < n) {
        const int64_t rest = n - i;
        T param_pad[Codec::kChunk] = {};
        T grad_pad[Codec::kChunk] = {};
        uint8_t code_pad[Codec::kChunk];
        std::copy(param + start + i, param + start + n, param_pad);
        std::copy(grad + start + i, grad + start + n, grad_pad);
        std::copy(code + start + i, code + start + n, code_pad);
        std::fill(code_pad + rest, code_pad + Codec::kChunk, kZeroCode);
        update_chunk_8bit<false>(param_pad, grad_pad, code_pad, buf + i, old_absmax, rule_hyper, options, codec,
                                 running);  // i + kChunk <= kBlockSize
        std::copy(param_pad, param_pad + rest, param + start + i);
        new_absmax = absmax_accumulate(new_absmax, block_absmax(buf + i, rest));
      }
      pending.quantize_next(codec, kBlockSize);  // the rest of the previous block
      absmax[block] = canonical_nan(new_absmax);
      pending = PendingCodes{buf, code + start, n, 0, absmax[block]};
    }
    pending.quantize_next(codec, kBlockSize);
  });
}

template <typename scalar_t>
void sgd8bit_update_typed(at::TensorList params, at::TensorList grads, at::TensorList codes,
                          at::TensorList absmax, const std::vector<BlockLayout>& layouts, const SgdHyper<float>& h) {
  const bool prefetch = prefetch_ahead();
  parallel_over_blocks(numels_of(params), layouts, [&](size_t t, int64_t first, int64_t last) {
    const Codec codec;
    update_blocks_8bit(params[t].data_ptr<scalar_t>(), grads[t].const_data_ptr<scalar_t>(),
                       codes[t].data_ptr<uint8_t>(), absmax[t].data_ptr<float>(), layouts[t], first, last, h,
                       static_cast<uint32_t>(t), codec, prefetch);
  });
}

void sgd8bit_update(at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList absmax,
                    const std::vector<BlockLayout>& layouts, const SgdHyper<double>& hyper) {
  if (params.empty()) {
    return;
  }
  const SgdHyper<float> h = cast_hyper<float>(hyper);
  // float64 params keep full-precision state (the op checks), so no float64 instantiation.
  const auto run = [&](auto param_type) {
    sgd8bit_update_typed<decltype(param_type)>(params, grads, codes, absmax, layouts, h);
  };
  switch (params[0].scalar_type()) {
    case at::kFloat:
      return run(float{});
    case at::kBFloat16:
      return run(c10::BFloat16{});
    case at::kHalf:
      return run(c10::Half{});
    default:
      TORCH_CHECK(false, "torchsgd8: 8-bit state is for float32/bfloat16/float16 params, got ",
                  params[0].scalar_type());
  }
}

void quantize_blockwise(const at::Tensor& values, const at::Tensor& codes, const at::Tensor& absmax,
                        BlockLayout layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "quantize_blockwise", [&] {
    const scalar_t* in = values.const_data_ptr<scalar_t>();
    uint8_t* out = codes.data_ptr<uint8_t>();
    float* scale = absmax.data_ptr<float>();
    const Codec codec;
    parallel_for_each_block(values.numel(), layout, [&](int64_t block, int64_t start, int64_t n) {
      alignas(64) float block_values[kBlockSize];
      std::copy(in + start, in + start + n, block_values);  // converts to float
      quantize_block(codec, block_values, n, out + start, scale + block);
    });
  });
}

void dequantize_blockwise(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& out,
                          BlockLayout layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dequantize_blockwise", [&] {
    const uint8_t* in = codes.const_data_ptr<uint8_t>();
    const float* scale = absmax.const_data_ptr<float>();
    scalar_t* values = out.data_ptr<scalar_t>();
    const Codec codec;
    parallel_for_each_block(codes.numel(), layout, [&](int64_t block, int64_t start, int64_t n) {
      alignas(64) float block_values[kBlockSize];
      codec.dequantize(in + start, scale[block], n, block_values);
      std::copy(block_values, block_values + n, values + start);  // converts to scalar_t
    });
  });
}

}  // namespace

#define TORCHSGD8_STRINGIFY2(x) #x
#define TORCHSGD8_STRINGIFY(x) TORCHSGD8_STRINGIFY2(x)

extern const KernelTable kKernels = {TORCHSGD8_STRINGIFY(CPU_CAPABILITY), &sgd_update, &sgd8bit_update,
                              &quantize_blockwise, &dequantize_blockwise};

}  // namespace CPU_CAPABILITY
}  // namespace torchsgd8::cpu
