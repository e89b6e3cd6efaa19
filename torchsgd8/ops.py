"""Typed Python wrappers of the torchsgd8 ops, and their fake (meta) implementations.

The schemas are declared in csrc/ops.cpp; kernels are in csrc/<device>/. The fake implementations
describe outputs only, so the ops trace under torch.compile, torch.export and FakeTensor.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the library that registers the ops)
from . import triton as triton_kernels
from .quantization import BLOCK_SIZE

__all__ = ["sgd_update_", "sgd8bit_update_", "grads_fit", "quantize_blockwise", "dequantize_blockwise",
           "num_blocks", "absmax_shape"]


def num_blocks(numel):
    """Number of 256-element absmax blocks of a tensor with ``numel`` elements (works for SymInts)."""
    return (numel + BLOCK_SIZE - 1) // BLOCK_SIZE


def absmax_shape(shape: Sequence[int], per_row: bool) -> tuple:
    """absmax's shape for values of ``shape`` in the flat or the per-row layout (works for SymInts)."""
    if not per_row:
        return (num_blocks(math.prod(shape)),)
    torch._check(len(shape) >= 2, lambda: f"quantize_blockwise: per_row needs 2 or more dims, got {len(shape)}")
    return (shape[0], num_blocks(math.prod(shape[1:])))


def sgd_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    lr: Tensor,
    momentum: Tensor,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    rounding_seed: Optional[Tensor] = None,
) -> None:
    """torch.optim.SGD's update of every param in place (momentum_buffers empty when momentum == 0).

    grad_scale / found_inf: GradScaler's protocol (grads are divided by grad_scale; nothing changes when
    found_inf is nonzero). rounding_seed: int64 0-dim tensor; bf16 params are then rounded stochastically.
    """
    torch.ops.torchsgd8.sgd_update_.default(
        params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
        first_step, grad_scale, found_inf, rounding_seed,
    )


def sgd8bit_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    codes: Sequence[Tensor],
    absmax: Sequence[Tensor],
    *update_args: Any,
    steps: Optional[Sequence[Tensor]] = None,
    **update_kwargs: Any,
) -> None:
    """sgd_update_ with each momentum buffer held as 8-bit blockwise codes + absmax, updated in place;
    ``update_args`` / ``update_kwargs``: sgd_update_'s arguments from ``lr`` on (the ops share them).

    steps: the params' step counters (one-element float32 CPU tensors), each incremented in place when
    the step runs (not when found_inf is nonzero).
    """
    torch.ops.torchsgd8.sgd8bit_update_.default(params, grads, codes, absmax, *update_args, steps=steps, **update_kwargs)


def grads_fit(params: Sequence[Tensor], grads: Sequence[Tensor]) -> bool:
    """Whether one update op call could take these params and grads: every param on params[0]'s device and
    contiguous, every grad dense and contiguous with its param's shape, dtype and device. Never raises."""
    return torch.ops.torchsgd8.grads_fit.default(params, grads)


def quantize_blockwise(values: Tensor, per_row: bool = False) -> tuple[Tensor, Tensor]:
    """values -> (uint8 codes of values' shape, float32 absmax with one entry per 256-element block).

    Blocks run over the flattened tensor (absmax: ``(ceil(numel / 256),)``), or with ``per_row`` within
    each index of dim 0, restarting at every row (absmax: ``(values.shape[0], ceil(row / 256))``).
    """
    return torch.ops.torchsgd8.quantize_blockwise.default(values, per_row)


def dequantize_blockwise(codes: Tensor, absmax: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(codes, absmax) -> values of ``dtype``: qmap[code] * absmax[block]; absmax's shape (a vector or a
    matrix, see quantize_blockwise) says which layout the blocks have."""
    return torch.ops.torchsgd8.dequantize_blockwise.default(codes, absmax, dtype)


@torch.library.register_fake("torchsgd8::sgd_update_")
def _(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, maximize,
      first_step, grad_scale=None, found_inf=None, rounding_seed=None):
    torch._check(len(params) == len(grads), lambda: "sgd_update_: params and grads differ in length")
    return None


@torch.library.register_fake("torchsgd8::sgd8bit_update_")
def _(params, grads, codes, absmax, lr, momentum, dampening, weight_decay, nesterov, maximize,
      first_step, grad_scale=None, found_inf=None, rounding_seed=None, steps=None):
    torch._check(len(params) == len(grads) == len(codes) == len(absmax),
                 lambda: "sgd8bit_update_: params, grads, codes and absmax differ in length")
    torch._check(steps is None or len(steps) == len(params), lambda: "sgd8bit_update_: params and steps differ in length")
    return None


@torch.library.register_fake("torchsgd8::quantize_blockwise")
def _(values, per_row=False):
    codes = torch.empty_like(values, dtype=torch.uint8, memory_format=torch.contiguous_format)
    absmax = values.new_empty(absmax_shape(values.shape, per_row), dtype=torch.float32)
    return codes, absmax


@torch.library.register_fake("torchsgd8::dequantize_blockwise")
def _(codes, absmax, dtype):
    return torch.empty_like(codes, dtype=dtype, memory_format=torch.contiguous_format)


# The GPU kernels: the public ops run the kernel ops (torchsgd8::_*_kernel_) for tensors on devices without
# C++ kernels (csrc/op_contract.cpp); on CUDA (and ROCm, which uses its key) and XPU those are Triton
# launchers (torchsgd8/triton), which import triton on their first call, never here.
_GPU_KERNELS = torch.library.Library("torchsgd8", "IMPL")
for _dispatch_key in ("CUDA", "XPU"):
    triton_kernels.register_kernels(_GPU_KERNELS, _dispatch_key)
