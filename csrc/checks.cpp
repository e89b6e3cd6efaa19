// Device-independent ops (CompositeImplicitAutograd: they read tensor metadata only, so one
// implementation serves every device, FakeTensors included).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "op_checks.h"

namespace torchsgd8 {
namespace {

// Whether one update call could take these params and grads: all params on params[0]'s device and
// contiguous; every grad dense and contiguous, with its param's shape, dtype and device. The optimizer
// asks this once per step for all the params of a planned step instead of asking per param in Python
// (about 1.5 us per param when the caches are cold); a false answer sends it to the path that reports
// the offending param.
bool grads_fit(at::TensorList params, at::TensorList grads) {
  if (params.size() != grads.size()) {
    return false;
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (!p.defined() || !grads[i].defined() || p.layout() != at::kStrided || p.device() != params[0].device() ||
        !p.is_contiguous() || grad_misfit(p, grads[i]) != GradMisfit::kNone) {
      return false;
    }
  }
  return true;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchsgd8, CompositeImplicitAutograd, m) {
  m.impl("grads_fit", &grads_fit);
}

}  // namespace torchsgd8
