// The CPU kernels' update loops, compiled once per instruction set: CPU_CAPABILITY names the copy (DEFAULT,
// AVX2, AVX512) and selects at::vec's implementation, exactly as ATen builds its own kernels. Each copy
// includes its kernel set's header (isa_*.h) for what that instruction set does its own way:
//  * Codec: 8-bit (de)quantization of one block. Every kernel set gives the same bits: the codebook value
//    times absmax (one rounding) to dequantize, the exact nearest code of v / absmax (IEEE division) to
//    quantize. A Codec holds what its ISA keeps in registers while (de)quantizing; one is built per range.
//  * max_lane, for AbsMax; overloads of simd.h's load_parts / store_parts for a type it converts its own
//    way; for the portable set, a lane-wise fused multiply-add (sgd_rule.h's FusedMultiplyAdd).
//
// Work is split between threads by blocks (thread_split.h). Each block is one pass over memory; the 8-bit
// kernel keeps the block's new buffer in a 1 KiB stack array until its codes are written.
//
// GCC's inlining decisions here depend on the order in which inline functions are first declared, and the
// 8-bit loops are only fast with the codec inlined into them: keep the includes in this order (the at::vec
// headers before quant.h; the thread split before the kernel set's header).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../quant.h"
#include "../sgd_rule.h"
#include "kernels.h"
#include "simd.h"
#include "thread_split.h"

#if defined(CPU_CAPABILITY_AVX512)
#include "isa_avx512.h"
#elif defined(CPU_CAPABILITY_AVX2)
#include "isa_avx2.h"
#else
#include "isa_portable.h"
#endif

namespace torchsgd8::cpu {
namespace CPU_CAPABILITY {
namespace {

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

// The full-precision kernel prefetches one 4 KiB page ahead for 16-bit params (where prefetch_ahead() says
// it pays): one SIMD step then covers a single cache line of each stream, and the hardware prefetchers stop
// at page boundaries. fp32 params, two lines a step, run faster without it.
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
    return canonical_nan(c10::bit_cast<float>(max_lane(bits)));
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
