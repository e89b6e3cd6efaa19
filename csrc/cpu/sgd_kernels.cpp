// CPU kernels, compiled once per instruction set: CPU_CAPABILITY names the copy (DEFAULT, AVX2) and
// selects at::vec's implementation, exactly as ATen builds its own kernels.
//
// Work is split into 256-element blocks across all tensors of a call, so one at::parallel_for covers a
// whole param group however many small tensors it has, and no block is ever shared by two threads
// (results do not depend on the thread count). Each block is one pass over memory; the 8-bit kernel
// keeps the block's dequantized buffer in a 1 KiB stack array.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#if defined(CPU_CAPABILITY_AVX2)
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

#if !defined(CPU_CAPABILITY_AVX2)
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

// Runs fn(tensor_index, first_block, end_block) over ranges of consecutive blocks that together cover
// blocks [0, block_counts[t]) of every tensor t. One parallel region for all tensors.
template <typename Fn>
void parallel_over_blocks(c10::ArrayRef<int64_t> block_counts, const Fn& fn) {
  std::vector<int64_t> first_block(block_counts.size() + 1, 0);
  for (const auto i : c10::irange(block_counts.size())) {
    first_block[i + 1] = first_block[i] + block_counts[i];
  }
  const int64_t total = first_block.back();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / kBlockSize);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(first_block.begin(), first_block.end(), begin) - first_block.begin() - 1;
    for (int64_t block = begin; block < end;) {
      while (block >= first_block[t + 1]) {
        ++t;  // skips empty tensors too
      }
      const int64_t stop = std::min(end, first_block[t + 1]);
      fn(t, block - first_block[t], stop - first_block[t]);
      block = stop;
    }
  });
}

// Runs fn(block, start, size) for every block of one tensor laid out as `layout`, in parallel.
template <typename Fn>
void parallel_for_each_block(int64_t blocks, BlockLayout layout, const Fn& fn) {
  parallel_over_blocks(blocks, [&](size_t, int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      fn(block, layout.start(block), layout.size(block));
    }
  });
}

std::vector<int64_t> flat_block_counts(at::TensorList tensors) {
  std::vector<int64_t> counts;
  counts.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    counts.push_back(num_blocks(t.numel()));
  }
  return counts;
}

std::vector<int64_t> block_counts(at::TensorList absmax) {
  std::vector<int64_t> counts;
  counts.reserve(absmax.size());
  for (const at::Tensor& a : absmax) {
    counts.push_back(a.numel());
  }
  return counts;
}

// SIMD lanes: kParts vectors of acc_t per step. bf16/fp16 load as two float vectors, so one step is
// always kParts * Vectorized<acc_t>::size() elements of any storage type.
constexpr int kParts = 2;
template <typename acc_t>
constexpr int64_t kStep = kParts * Vectorized<acc_t>::size();

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

// param[i], buf[i] <- sgd_rule(param[i], grad[i], buf[i]) for i < n. B is the buffer's storage type: the
// param's dtype for the fp32-precision op, float for the 8-bit op's dequantized block.
template <typename T, typename B, typename acc_t>
void update_range(T* param, const T* grad, B* buf, int64_t n, const SgdHyper<acc_t>& hyper, uint32_t tensor,
                  int64_t first_index) {
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
  for (; i + kStep<acc_t> <= n; i += kStep<acc_t>) {
    Vectorized<acc_t> p[kParts], g[kParts], b[kParts];
    load_parts(param + i, p);
    load_parts(grad + i, g);
    if (read_buf) {
      load_parts(buf + i, b);
    }
    for (int k = 0; k < kParts; ++k) {
      p[k] = sgd_rule(p[k], g[k], b[k], h);
    }
    store_parts(param + i, p);
    if (h.use_momentum) {
      store_parts(buf + i, b);
    }
  }
  for (; i < n; ++i) {
    acc_t b = read_buf ? static_cast<acc_t>(buf[i]) : acc_t(0);
    param[i] = static_cast<T>(sgd_rule(static_cast<acc_t>(param[i]), static_cast<acc_t>(grad[i]), b, h));
    if (h.use_momentum) {
      buf[i] = static_cast<B>(b);
    }
  }
}

// NaN-propagating max over the lanes of a running vector max of |v|.
inline float reduce_absmax(const Vectorized<float>& running) {
  float lanes[Vectorized<float>::size()];
  running.store(lanes);
  float result = 0.0f;
  for (float lane : lanes) {
    result = absmax_accumulate(result, lane);
  }
  return result;
}

// NaN-propagating max |v| of a float block.
inline float block_absmax(const float* v, int64_t n) {
  using Vec = Vectorized<float>;
  int64_t i = 0;
  Vec running(0.0f);
  for (; i + Vec::size() <= n; i += Vec::size()) {
    running = at::vec::maximum(running, Vec::loadu(v + i).abs());  // maximum propagates NaN
  }
  float result = reduce_absmax(running);
  for (; i < n; ++i) {
    result = absmax_accumulate(result, v[i]);
  }
  return canonical_nan(result);
}

#if defined(CPU_CAPABILITY_AVX2)
// nearest_code() for 8 lanes: one gather from the 6 KiB bucket table (L1-resident).
inline void quantize_normalised_avx2(const float* v, float absmax, int64_t n, uint8_t* codes, int64_t& i) {
  const __m256 scale = _mm256_set1_ps(absmax);
  const __m256i magnitude_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i low_mask = _mm256_set1_epi32(static_cast<int>(kLowMask));
  const __m256i offset = _mm256_set1_epi32(kBucketOffset);
  const __m256i last_bucket = _mm256_set1_epi32(kNumBuckets - 1);
  const __m256i zero_code = _mm256_set1_epi32(kZeroCode);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_div_ps(_mm256_loadu_ps(v + i), scale);
    const __m256i bits = _mm256_and_si256(_mm256_castps_si256(x), magnitude_mask);
    __m256i bucket = _mm256_sub_epi32(_mm256_srli_epi32(bits, kBucketShift), offset);
    bucket = _mm256_min_epi32(_mm256_max_epi32(bucket, _mm256_setzero_si256()), last_bucket);
    const __m256i entry = _mm256_i32gather_epi32(kBucketTable, bucket, 4);
    const __m256i above = _mm256_cmpgt_epi32(_mm256_and_si256(bits, low_mask), _mm256_and_si256(entry, low_mask));
    const __m256i c = _mm256_sub_epi32(_mm256_srli_epi32(entry, kBucketShift), above);  // true is -1
    const __m256i negative = _mm256_castps_si256(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ));
    const __m256i code = _mm256_blendv_epi8(_mm256_add_epi32(zero_code, c),
                                            _mm256_sub_epi32(zero_code, _mm256_min_epi32(c, zero_code)), negative);
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(words, words));
  }
}

inline void dequantize_avx2(const uint8_t* codes, float absmax, int64_t n, float* out, int64_t& i) {
  const __m256 scale = _mm256_set1_ps(absmax);
  for (; i + 8 <= n; i += 8) {
    const __m256i index = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_i32gather_ps(kSignedDynamicMap, index, 4), scale));
  }
}
#endif

inline void dequantize_block(const uint8_t* codes, float absmax, int64_t n, float* out) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2)
  dequantize_avx2(codes, absmax, n, out, i);
#endif
  for (; i < n; ++i) {
    out[i] = dequantize_value(codes[i], absmax);
  }
}

// Codes of a block whose absmax is already known.
inline void quantize_with_absmax(const float* v, int64_t n, float a, uint8_t* codes) {
  if (a == 0.0f) {
    std::fill(codes, codes + n, kZeroCode);
    return;
  }
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX2)
  quantize_normalised_avx2(v, a, n, codes, i);
#endif
  for (; i < n; ++i) {
    codes[i] = nearest_code(v[i] / a);
  }
}

inline void quantize_block(const float* v, int64_t n, uint8_t* codes, float* absmax) {
  *absmax = block_absmax(v, n);
  quantize_with_absmax(v, n, *absmax, codes);
}

// kParts float vectors of dequantized codes (one step of the SIMD loops).
inline void load_dequantized(const uint8_t* codes, float absmax, Vectorized<float> (&v)[kParts]) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 scale = _mm256_set1_ps(absmax);
  for (int k = 0; k < kParts; ++k) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * k));
    const __m256 q = _mm256_i32gather_ps(kSignedDynamicMap, _mm256_cvtepu8_epi32(bytes), 4);
    v[k] = Vectorized<float>(_mm256_mul_ps(q, scale));
  }
#else
  alignas(64) float values[kStep<float>];
  dequantize_block(codes, absmax, kStep<float>, values);
  for (int k = 0; k < kParts; ++k) {
    v[k] = Vectorized<float>::loadu(values + k * Vectorized<float>::size());
  }
#endif
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
    // blocks only split the work here: each range is contiguous elements
    parallel_over_blocks(flat_block_counts(params), [&](size_t t, int64_t first, int64_t last) {
      const int64_t begin = first * kBlockSize;
      const int64_t end = std::min(last * kBlockSize, params[t].numel());
      scalar_t* buf = h.use_momentum ? momentum_buffers[t].data_ptr<scalar_t>() + begin : nullptr;
      update_range(params[t].data_ptr<scalar_t>() + begin, grads[t].const_data_ptr<scalar_t>() + begin, buf,
                   end - begin, h, static_cast<uint32_t>(t), begin);
    });
  });
}

// One 256-element block of the 8-bit step in one pass: dequantize the old buffer, apply the rule, track
// the new absmax, then requantize from a 1 KiB stack copy of the new buffer (L1-resident).
template <typename T>
void update_block_8bit(T* param, const T* grad, uint8_t* code, float* absmax, int64_t n,
                       const SgdHyper<float>& hyper, uint32_t tensor, int64_t first_index) {
  alignas(64) float buf[kBlockSize];
  const SgdHyper<float> h = hyper;  // local copy: see update_range
  if (h.stochastic_rounding) {  // bf16 only: the rule runs in the scalar stochastic-rounding loop
    if (h.first_step) {
      std::fill(buf, buf + n, 0.0f);  // stays 0 when the momentum value is 0 (the rule leaves it alone)
    } else {
      dequantize_block(code, *absmax, n, buf);
    }
    update_range(param, grad, buf, n, h, tensor, first_index);
    quantize_block(buf, n, code, absmax);
    return;
  }
  const float old_absmax = *absmax;
  Vectorized<float> running(0.0f);
  int64_t i = 0;
  for (; i + kStep<float> <= n; i += kStep<float>) {
    Vectorized<float> p[kParts], g[kParts], b[kParts] = {Vectorized<float>(0.0f), Vectorized<float>(0.0f)};
    load_parts(param + i, p);
    load_parts(grad + i, g);
    if (!h.first_step) {
      load_dequantized(code + i, old_absmax, b);
    }
    for (int k = 0; k < kParts; ++k) {
      p[k] = sgd_rule(p[k], g[k], b[k], h);
      running = at::vec::maximum(running, b[k].abs());  // maximum propagates NaN
      b[k].store(buf + i + k * Vectorized<float>::size());
    }
    store_parts(param + i, p);
  }
  float new_absmax = reduce_absmax(running);
  for (; i < n; ++i) {
    float b = h.first_step ? 0.0f : dequantize_value(code[i], old_absmax);
    param[i] = static_cast<T>(sgd_rule(static_cast<float>(param[i]), static_cast<float>(grad[i]), b, h));
    buf[i] = b;
    new_absmax = absmax_accumulate(new_absmax, b);
  }
  new_absmax = canonical_nan(new_absmax);
  *absmax = new_absmax;
  quantize_with_absmax(buf, n, new_absmax, code);
}

template <typename scalar_t>
void sgd8bit_update_typed(at::TensorList params, at::TensorList grads, at::TensorList codes,
                          at::TensorList absmax, const std::vector<BlockLayout>& layouts, const SgdHyper<float>& h) {
  parallel_over_blocks(block_counts(absmax), [&](size_t t, int64_t first, int64_t last) {
    scalar_t* param = params[t].data_ptr<scalar_t>();
    const scalar_t* grad = grads[t].const_data_ptr<scalar_t>();
    uint8_t* code = codes[t].data_ptr<uint8_t>();
    float* scale = absmax[t].data_ptr<float>();
    const BlockLayout layout = layouts[t];
    for (int64_t block = first; block < last; ++block) {
      const int64_t start = layout.start(block);
      update_block_8bit(param + start, grad + start, code + start, scale + block, layout.size(block), h,
                        static_cast<uint32_t>(t), start);
    }
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
    parallel_for_each_block(absmax.numel(), layout, [&](int64_t block, int64_t start, int64_t n) {
      alignas(64) float block_values[kBlockSize];
      std::copy(in + start, in + start + n, block_values);  // converts to float
      quantize_block(block_values, n, out + start, scale + block);
    });
  });
}

void dequantize_blockwise(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& out,
                          BlockLayout layout) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "dequantize_blockwise", [&] {
    const uint8_t* in = codes.const_data_ptr<uint8_t>();
    const float* scale = absmax.const_data_ptr<float>();
    scalar_t* values = out.data_ptr<scalar_t>();
    parallel_for_each_block(absmax.numel(), layout, [&](int64_t block, int64_t start, int64_t n) {
      alignas(64) float block_values[kBlockSize];
      dequantize_block(in + start, scale[block], n, block_values);
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
