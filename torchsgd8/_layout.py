"""Which momentum state a param gets, and how its 8-bit state is laid out in blocks.

The step creates state by these rules and ``load_state_dict`` converts saved state to them (_state.py):

* no state while a group's momentum is a Python 0 (as torch.optim.SGD);
* 8-bit state (bitsandbytes' keys: uint8 codes ``state1``, float32 ``absmax1``, the codebook ``qmap1``, a
  float32 ``step``) for float32 / bfloat16 / float16 params of at least ``min_8bit_size`` elements in a
  group with ``optim_bits=8``; sharded (FSDP2) params only in the per-row layout, split along dim 0;
* otherwise torch's ``momentum_buffer``, in the param's dtype.

State of a sharded param is a DTensor with its param's mesh and placements.
"""
from __future__ import annotations

import enum
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from . import ops
from .quantization import signed_dynamic_map

try:  # FSDP2 shards params as DTensors
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = ()


class StateKind(enum.Enum):
    """What one param's momentum state is; compared by identity (through the aliases below) in the step."""
    NONE = "none"  # momentum 0: no state
    FULL = "full"  # momentum_buffer in the param's dtype
    EIGHT_BIT = "8bit"  # state1 (codes), absmax1, qmap1, step

    # Hashed by identity: the full pass keys buckets by (device, dtype, kind, first_step) per param, and
    # Enum's own __hash__ (hash of the name, in Python) made each key ~2x as slow to look up.
    __hash__ = object.__hash__


# Module-level aliases: `kind is EIGHT_BIT` is a cached global read, `StateKind.EIGHT_BIT` an enum class
# attribute lookup costing ~10x more, which the step would pay per param.
NONE, FULL, EIGHT_BIT = StateKind.NONE, StateKind.FULL, StateKind.EIGHT_BIT

# dtypes whose momentum can be kept in 8 bits; others (float64, complex) keep a full-precision buffer.
EIGHT_BIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# 8-bit state of params with at least 2 dims and rows (dim-0 slices) of at least this many elements is
# blocked per row: blocks restart at every row (csrc/quant.h, BlockLayout), so FSDP2's Shard(0) splits
# the state exactly like its param at any world size and a checkpoint moves between sharded and
# unsharded runs unchanged. Shorter rows would cost more than 1/32 byte of absmax per element; those
# params and 1-D ones use flat blocks (bitsandbytes' layout), and keep full-precision state when sharded.
MIN_ROW_LENGTH = 128

# Built eagerly at import and copied to each device: built inside a compiled step, inductor's linspace
# would round some entries differently from bitsandbytes'.
_CODEBOOK = signed_dynamic_map()


def codebook_copy(device: torch.device) -> Tensor:
    """A new copy of the 256-entry codebook (bitsandbytes' ``qmap1``) on ``device``."""
    return _CODEBOOK.to(device, copy=True)


def uses_momentum(momentum: float | Tensor) -> bool:
    """Whether params of a group get momentum state. A tensor momentum is meant to be scheduled, so it
    always gets one: reading its value here would break a compiled graph (and sync a device). The kernel
    reads the value, and while it is 0 updates like torch without momentum, leaving the buffer alone."""
    return isinstance(momentum, Tensor) or momentum != 0


def per_row(p: Tensor) -> bool:
    """Whether p's 8-bit state is blocked per row (else flat)."""
    return p.dim() >= 2 and math.prod(p.shape[1:]) >= MIN_ROW_LENGTH


def absmax_shape(p: Tensor) -> tuple[int, ...]:
    """(blocks,) for the flat layout; (rows, blocks per row) for the per-row one."""
    return ops.absmax_shape(p.shape, per_row(p))


def gets_8bit_state(p: Tensor, group: dict) -> bool:
    if not (group["optim_bits"] == 8 and p.dtype in EIGHT_BIT_DTYPES and p.numel() >= group["min_8bit_size"]):
        return False
    if not isinstance(p, DTensor):
        return True
    # shards split dim 0: whole rows of blocks go to each rank
    return per_row(p) and all(pl.is_shard(0) or pl.is_replicate() for pl in p.placements)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: updating it updates the DTensor), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def like_param(p: Tensor, local_part: Tensor, shape: Optional[tuple[int, ...]] = None) -> Tensor:
    """State for `p` from this rank's `local_part`: a DTensor with p's mesh and placements when p is one,
    so torch.distributed.checkpoint sees state sharded exactly like its param (global `shape`: p's)."""
    if isinstance(p, DTensor):
        shape = tuple(p.shape) if shape is None else tuple(shape)
        stride = tuple(int(torch.Size(shape)[i + 1:].numel()) for i in range(len(shape)))
        return DTensor.from_local(local_part, p.device_mesh, p.placements, run_check=False, shape=shape,
                                  stride=stride)
    return local_part


def step_counter_device(p: Tensor) -> torch.device:
    """Where the 8-bit state's step counter of p lives: with the param (the op counts on that device without
    reading GradScaler's found_inf on the host, also in a CUDA graph), except for meta params, whose
    counters stay on the CPU (the meta kernels count nothing)."""
    device = local(p).device
    return torch.device("cpu") if device.type == "meta" else device


def init_state(p: Tensor, group: dict, state: dict, codebook: Callable[[torch.device], Tensor]) -> None:
    """Fills `state` (empty) for p's first step; `codebook(device)` gives the qmap to share. Uninitialised:
    the ops write all of it on a first step (zeros where that step is skipped), so a compiled first step
    allocates it without generating fill kernels."""
    shard = local(p)
    if gets_8bit_state(p, group):
        state["step"] = torch.zeros((), dtype=torch.float32, device=step_counter_device(p))
        state["state1"] = like_param(p, torch.empty(shard.shape, dtype=torch.uint8, device=shard.device))
        shard_absmax = torch.empty(ops.absmax_shape(shard.shape, per_row(p)), dtype=torch.float32, device=shard.device)
        state["absmax1"] = like_param(p, shard_absmax, absmax_shape(p))
        state["qmap1"] = codebook(shard.device)
    else:
        state["momentum_buffer"] = like_param(p, torch.empty(shard.shape, dtype=shard.dtype, device=shard.device))
