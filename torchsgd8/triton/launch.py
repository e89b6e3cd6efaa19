"""Launchers of the Triton kernels: the device implementations of torchsgd8's kernel ops.

Each launcher takes the op's arguments as the device-independent contract layer hands them over: checked
(one device and dtype per call, contiguous tensors, matching shapes and block layouts), complex tensors
viewed as real, and, on a skipped first step, the state already zeroed. Hyperparameter tensors are read by
the kernels on the device; a CPU one is copied there without waiting (non_blocking). Nothing here reads a
device value on the host, so a call never synchronises.

One launch per call: the call's tensors are described by two small device tables (kernels.py explains them),
built on the first call with a given set of tensors - same addresses, shapes and block layouts - and reused
from a cache afterwards, so a steady-state step (or a CUDA graph captured after warm-up) copies nothing to
the device and builds nothing. The cache drops the least recently used tables beyond CACHE_ENTRIES, except
those a CUDA graph was captured with, which it keeps for good. The key is computed in Python, about 1 us
per tensor of the call (data_ptr() costs 0.2 us); grads that move between steps (set_to_none=True with an
allocator that does not hand back the same blocks) make new tables: 80 bytes per tensor and 4 per program,
copied without waiting.
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton.language as tl
from torch import Tensor

from . import kernels

__all__ = ["sgd_update", "sgd8bit_update", "quantize_blockwise", "dequantize_blockwise", "quant_tables"]

# Launch configuration, to be tuned on hardware. A program of sgd_update_kernel updates UPDATE_CHUNK elements
# with UPDATE_WARPS warps (16 per thread: four 16-byte accesses per stream for float32). A program of the
# blockwise kernels works on BLOCKS_PER_PROGRAM blocks of 256 with BLOCKWISE_WARPS warps: 4 elements per
# thread, the width of the 16-byte float32 stores; with 8 per thread (4 warps) the compiler computes in a
# layout of 8 and moves the params through shared memory to store them (ttg.convert_layout, sm_90).
UPDATE_CHUNK = 2048
UPDATE_WARPS = 4
BLOCKS_PER_PROGRAM = 4
BLOCKWISE_WARPS = 8
# Tables kept per (op, device, dtype, tensors): enough for every bucket of a few models' steps.
CACHE_ENTRIES = 256

# bfloat16 is moved as its bits (kernels.py: the interpreter's bfloat16 conversions are not the GPU's).
_STORAGE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
            torch.bfloat16: tl.uint16}


def quant_tables() -> dict:
    """The codebook and the nearest-code lookup compiled into the extension from csrc/quant.h:
    {"signed_dynamic_map": bytes (256 float32), "bucket_table": bytes (int32), "bucket_shift": int,
    "bucket_offset": int, "block_size": int, "zero_code": int}."""
    from .. import _C

    return _C.quant_tables()


class _LruCache:
    """A bounded map from keys to values built on a miss; least recently used entries go first, except those
    asked to be kept: a CUDA graph captured with a value's tables reads them at every replay."""

    def __init__(self, capacity: int):
        self._capacity = capacity
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._kept: dict = {}
        self._lock = threading.Lock()

    def get(self, key, build: Callable, keep: bool = False):
        with self._lock:
            value = self._kept.get(key)
            if value is None:
                value = self._entries.get(key)
                if value is not None:
                    self._entries.move_to_end(key)
            if value is not None:
                if keep:
                    self._kept[key] = self._entries.pop(key, value)
                return value
        value = build()
        with self._lock:
            if keep:
                self._kept[key] = value
            else:
                self._entries[key] = value
                while len(self._entries) > self._capacity:
                    self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._kept.clear()

    def __len__(self) -> int:
        return len(self._entries) + len(self._kept)


_plans = _LruCache(CACHE_ENTRIES)
_constants = _LruCache(CACHE_ENTRIES)
_codecs = _LruCache(64)


def _capturing(device: torch.device) -> bool:
    """Whether the current stream is capturing a CUDA graph: the tables then stay cached for good."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _upload(host: Tensor, device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    """(host's data on the device, the pinned host copy it came from). The copy does not wait; keeping the host
    copy with the device one keeps a copy captured into a CUDA graph valid at every replay."""
    if device.type == "cpu":
        return host, None
    pinned = host.pin_memory()
    return pinned.to(device, non_blocking=True), pinned


def _on(tensor: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    """A hyperparameter tensor on the kernel's device (copied there without waiting if it is elsewhere)."""
    if tensor is None or tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=True)


def _device_guard(device: torch.device):
    """Triton launches on the current device and stream: make it the tensors' device."""
    if device.type == "cpu":
        return contextlib.nullcontext()
    return torch.get_device_module(device.type).device(device)


class _Codec(NamedTuple):
    qmap: Tensor  # float32[256] on the device
    bucket_table: Tensor  # int32 on the device
    block_size: int
    zero_code: int
    bucket_shift: int
    bucket_offset: int
    host_copies: tuple  # see _upload


def _codec(device: torch.device) -> _Codec:
    def build():
        tables = quant_tables()
        qmap = torch.frombuffer(bytearray(tables["signed_dynamic_map"]), dtype=torch.float32)
        buckets = torch.frombuffer(bytearray(tables["bucket_table"]), dtype=torch.int32)
        (qmap, qmap_host), (buckets, buckets_host) = _upload(qmap, device), _upload(buckets, device)
        return _Codec(qmap, buckets, tables["block_size"], tables["zero_code"], tables["bucket_shift"],
                      tables["bucket_offset"], (qmap_host, buckets_host))

    return _codecs.get(device, build, keep=True)


def _rule_constants(device: torch.device, dampening: float, weight_decay: float) -> Tensor:
    """float64 [1 - dampening, weight_decay] on the device: the kernels narrow them to their accumulation type
    as the CPU kernels do (a float kernel argument would be float32, too narrow for float64 params)."""
    return _constants.get((device, dampening, weight_decay), lambda: _upload(
        torch.tensor([1.0 - dampening, weight_decay], dtype=torch.float64), device), _capturing(device))[0]


class _Plan(NamedTuple):
    tensor_table: Tensor  # int64 [tensors, kernels.TABLE_WIDTH] on the device
    program_tensor: Tensor  # int32 [programs] on the device: each program's tensor
    num_programs: int
    aligned: bool  # every address of the call is a multiple of 16 bytes
    host_copies: tuple  # see _upload


class _TensorEntry(NamedTuple):
    param: int  # addresses (0: unused)
    grad: int
    state: int
    absmax: int
    numel: int
    row_length: int  # block layout (blockwise kernels); the whole tensor for sgd_update


def _build_plan(device: torch.device, entries: Sequence[_TensorEntry], blockwise: bool, block_size: int) -> _Plan:
    rows, programs = [], []
    aligned = True
    for e in entries:
        if blockwise:
            blocks_per_row = -(-e.row_length // block_size)
            num_rows = e.numel // e.row_length if e.row_length else 0
            num_blocks = num_rows * blocks_per_row
            # whole blocks at block * block_size: all of them when rows are whole blocks or there is one row,
            # else those of the first row
            regular = e.numel // block_size if num_rows <= 1 or e.row_length % block_size == 0 \
                else e.row_length // block_size
            units = -(-num_blocks // BLOCKS_PER_PROGRAM)
        else:
            blocks_per_row = num_blocks = regular = 0
            units = -(-e.numel // UPDATE_CHUNK)
        row = [e.param, e.grad, e.state, e.absmax, e.numel, e.row_length, blocks_per_row, num_blocks, regular,
               0]  # FIRST_PROGRAM, filled in below
        assert len(row) == kernels.TABLE_WIDTH.value
        rows.append(row)
        programs.append(units)
        if e.numel:
            aligned = aligned and e.param % 16 == 0 and e.grad % 16 == 0 and e.state % 16 == 0
    counts = torch.tensor(programs, dtype=torch.int64)
    first = torch.cumsum(counts, 0) - counts
    table = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), kernels.TABLE_WIDTH.value)
    table[:, kernels.FIRST_PROGRAM.value] = first
    program_tensor = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), counts)
    (table, table_host), (program_tensor, program_host) = _upload(table, device), _upload(program_tensor, device)
    return _Plan(table, program_tensor, int(counts.sum()), aligned, (table_host, program_host))


def _addresses(tensors: Sequence[Tensor]) -> tuple:
    return tuple(map(Tensor.data_ptr, tensors))


def _shapes(tensors: Sequence[Tensor]) -> tuple:
    return tuple(t.shape for t in tensors)


def _row_length(shape: torch.Size, absmax: Tensor) -> int:
    """quant.h's BlockLayout of values of `shape` whose absmax has absmax's shape (op_checks.h, absmax_layout):
    a vector is the flat layout, a matrix has blocks within each index of dim 0."""
    return math.prod(shape) if absmax.dim() == 1 else math.prod(shape[1:])


def _launch(kernel, device: torch.device, plan: _Plan, *arguments, **constants) -> None:
    """One launch of `kernel` over the plan's programs (none for a call of empty tensors): the plan's tables
    first, then `arguments`; `constants` are the kernel's constexpr arguments and launch options."""
    if plan.num_programs == 0:
        return
    with _device_guard(device):
        kernel[(plan.num_programs,)](plan.tensor_table, plan.program_tensor, *arguments, ALIGNED=plan.aligned,
                                     **constants)


def _kernel_flags(dtype: torch.dtype, rounding_seed: Optional[Tensor], num_warps: int) -> dict:
    if dtype not in _STORAGE:
        raise TypeError(f"torchsgd8.triton: unsupported dtype {dtype}")
    if rounding_seed is not None and dtype != torch.bfloat16:
        raise TypeError(f"torchsgd8.triton: stochastic rounding (rounding_seed) applies to bfloat16 params, "
                        f"got {dtype}")
    # no contraction of a * b + c into fmas beyond the rule's own (Triton 3.9 fuses by default)
    return dict(STORAGE=_STORAGE[dtype], num_warps=num_warps, enable_fp_fusion=False)


def sgd_update(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor], lr: Tensor,
               momentum: Tensor, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
               first_step: bool, grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
               rounding_seed: Optional[Tensor] = None) -> None:
    """The `_sgd_update_kernel_` op: torch.optim.SGD's update of every param (and buffer) in place.

    momentum_buffers is empty when the group has no momentum; a momentum value of 0 (read on the device)
    leaves the buffers untouched. first_step: buffers are written, not read. found_inf nonzero: nothing is
    written. grad_scale: grads are divided by it. rounding_seed (bfloat16 only): stochastic rounding of the
    new params, tensor i of the list drawing the noise of tensor index i.
    """
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    flags = _kernel_flags(dtype, rounding_seed, UPDATE_WARPS)
    has_momentum = len(momentum_buffers) > 0
    key = ("sgd_update", device, dtype, _addresses(params), _addresses(grads), _addresses(momentum_buffers),
           tuple(map(Tensor.numel, params)))

    def build():
        buffers = momentum_buffers if has_momentum else [None] * len(params)
        entries = [_TensorEntry(p.data_ptr(), g.data_ptr(), b.data_ptr() if b is not None else 0, 0, p.numel(),
                                p.numel()) for p, g, b in zip(params, grads, buffers)]
        return _build_plan(device, entries, blockwise=False, block_size=0)

    _launch(kernels.sgd_update_kernel, device, _plans.get(key, build, _capturing(device)),
            _on(lr, device), _on(momentum, device), _rule_constants(device, dampening, weight_decay),
            _on(grad_scale, device), _on(found_inf, device), _on(rounding_seed, device),
            ACC=tl.float64 if dtype == torch.float64 else tl.float32, HAS_MOMENTUM=has_momentum,
            MAXIMIZE=maximize, WEIGHT_DECAY=weight_decay != 0, FIRST_STEP=first_step, NESTEROV=nesterov,
            UPDATE_CHUNK=UPDATE_CHUNK, **flags)


def _blockwise_plan(op: str, device: torch.device, values: Sequence[Tensor], grads: Sequence[Tensor],
                    codes: Sequence[Tensor], absmax: Sequence[Tensor], block_size: int) -> _Plan:
    key = (op, device, values[0].dtype, _addresses(values), _addresses(grads), _addresses(codes),
           _addresses(absmax), _shapes(values), tuple(a.dim() for a in absmax))

    def build():
        grad_addresses = _addresses(grads) if grads else (0,) * len(values)
        entries = [_TensorEntry(v.data_ptr(), g, c.data_ptr(), a.data_ptr(), v.numel(), _row_length(v.shape, a))
                   for v, g, c, a in zip(values, grad_addresses, codes, absmax)]
        return _build_plan(device, entries, blockwise=True, block_size=block_size)

    return _plans.get(key, build, _capturing(device))


def _codec_flags(codec: _Codec) -> dict:
    return dict(BLOCKS=BLOCKS_PER_PROGRAM, BLOCK_SIZE=codec.block_size, ZERO_CODE=codec.zero_code,
                BUCKET_SHIFT=codec.bucket_shift, BUCKET_OFFSET=codec.bucket_offset,
                NUM_BUCKETS=codec.bucket_table.numel())


def sgd8bit_update(params: Sequence[Tensor], grads: Sequence[Tensor], codes: Sequence[Tensor],
                   absmax: Sequence[Tensor], lr: Tensor, momentum: Tensor, dampening: float, weight_decay: float,
                   nesterov: bool, maximize: bool, first_step: bool, grad_scale: Optional[Tensor] = None,
                   found_inf: Optional[Tensor] = None, rounding_seed: Optional[Tensor] = None) -> None:
    """The `_sgd8bit_update_kernel_` op: the update with 8-bit blockwise momentum (codes, absmax), in place.

    Per block: the buffer is decoded (0 on a first step: codes and absmax are then output only), the rule
    applied (a momentum value of 0 leaves the buffer as it is), the params stored, the buffer requantized.
    found_inf nonzero: nothing is written. Otherwise as sgd_update.
    """
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    flags = _kernel_flags(dtype, rounding_seed, BLOCKWISE_WARPS)
    codec = _codec(device)
    _launch(kernels.sgd8bit_update_kernel, device,
            _blockwise_plan("sgd8bit_update", device, params, grads, codes, absmax, codec.block_size),
            codec.qmap, codec.bucket_table, _on(lr, device), _on(momentum, device),
            _rule_constants(device, dampening, weight_decay), _on(grad_scale, device), _on(found_inf, device),
            _on(rounding_seed, device),
            MAXIMIZE=maximize, WEIGHT_DECAY=weight_decay != 0, FIRST_STEP=first_step, NESTEROV=nesterov,
            **_codec_flags(codec), **flags)


def quantize_blockwise(values: Tensor, codes: Tensor, absmax: Tensor) -> None:
    """Writes codes (uint8, values' shape) and absmax (float32) of values; absmax's shape gives the block layout:
    a vector for blocks of the flattened tensor, a (rows, blocks per row) matrix for blocks within each index of
    dim 0. float64 values are rounded to float32 first."""
    device = values.device
    flags = _kernel_flags(values.dtype, None, BLOCKWISE_WARPS)
    codec = _codec(device)
    _launch(kernels.quantize_blockwise_kernel, device,
            _blockwise_plan("quantize_blockwise", device, [values], [], [codes], [absmax], codec.block_size),
            codec.bucket_table, **_codec_flags(codec), **flags)


def dequantize_blockwise(codes: Tensor, absmax: Tensor, out: Tensor) -> None:
    """Writes out = qmap[code] * absmax of its block (one float32 rounding), converted to out's dtype."""
    device = codes.device
    flags = _kernel_flags(out.dtype, None, BLOCKWISE_WARPS)
    codec = _codec(device)
    _launch(kernels.dequantize_blockwise_kernel, device,
            _blockwise_plan("dequantize_blockwise", device, [out], [], [codes], [absmax], codec.block_size),
            codec.qmap, BLOCKS=BLOCKS_PER_PROGRAM, BLOCK_SIZE=codec.block_size, **flags)
