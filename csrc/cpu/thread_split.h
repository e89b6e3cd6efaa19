// How the CPU kernels split a call's work between threads: by elements across all tensors of the call, at
// the boundaries of the (up to) 256-element blocks, so one at::parallel_for covers a whole param group however
// many small tensors it has, and no block is ever shared by two threads (results do not depend on the thread
// count). The same for every kernel set; included by sgd_kernels.cpp only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <vector>

#include "../quant.h"

namespace torchsgd8::cpu {
namespace {

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

}  // namespace
}  // namespace torchsgd8::cpu
