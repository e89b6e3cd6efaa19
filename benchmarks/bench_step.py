#!/usr/bin/env python
"""Performance suite for one optimizer step (SGD, lr=0.01, momentum=0.9) on CPU or a CUDA GPU.

An SGD step is memory-bound, so every method is scored against the bytes it must move at the very least
("ideal bytes"), for parameters of n elements of s bytes each (s = 4 for the default fp32 params, 2 with
``--dtype bfloat16`` or ``float16``):

  * full-precision momentum (torch.optim.SGD, torchsgd8 fp32, bitsandbytes 32-bit, and any param an 8-bit
    optimizer keeps in full precision), a buffer of b bytes per element (b = s, but 4 for bitsandbytes):
    (3 * s + 2 * b) * n bytes
        read p, g (2 * s) + read and write buf (2 * b) + write p (s); 20 * n for fp32
  * 8-bit momentum (param whose state holds uint8 ``state1`` codes):  (3 * s + 2) * n + 8 * ceil(n / 256)
        read p, g (2 * s) + read and write codes (2 * 1 B) + write p (s)
        + read and write one float32 absmax per 256-element block (2 * 4 B per block); 14 * n + ... for fp32

Which formula a param gets is read from the optimizer's state after warm-up, so params below
``min_8bit_size`` (4096 for torchsgd8 and bitsandbytes) count as fp32 momentum.

The roofline is measured in the same run: ``a.add_(b, alpha=s)`` on two fp32 tensors with as many
elements as the model (12 B/element: read a, b; write a). Its bandwidth gives each method an ideal time
``ideal_bytes / axpy_bandwidth``; ``x_roofline`` is measured time / ideal time (1.0 = as fast as the
bytes allow).

With ``--device cuda`` params, grads and state live on the GPU, and the roofline is a device-to-device copy,
``dst.copy_(src)`` of two fp32 tensors with as many elements as the model (8 B/element: read src, write dst),
the GPU's copy bandwidth. A repetition there times ``--steps-per-rep`` consecutive steps between two CUDA
events (the host queues steps ahead, as in training), and a method's time per step is the median over
repetitions. torchsgd8's steps are also compiled with ``mode="reduce-overhead"`` (CUDA graphs); where
Inductor declines to use CUDA graphs, the row's note says why.

Methods are interleaved round-robin (the starting method rotates every repetition) so that machine noise
is spread over all of them, and the median per-step time is reported. Compiled methods compile during
warm-up; their compile time is the warm-up time beyond ``warmup`` steady-state steps. Each run uses a
fresh Inductor cache, so every compiled method (torch's and ours) compiles cold; ``--warm-cache`` keeps
the usual cache instead (a cache left by earlier runs favours whichever graphs it holds).

Usage (see benchmarks/README.md):
  python benchmarks/bench_step.py                         # 1M, 16M, 64M params; mixed and single layouts
  python benchmarks/bench_step.py --sizes 1M --reps 3     # quick check
  python benchmarks/bench_step.py --layouts deep         # 855 tensors at 16M: what each tensor costs
  python benchmarks/bench_step.py --dtype bfloat16        # bf16 params and grads (full-precision buffers bf16 too)
  python benchmarks/bench_step.py --isa avx2              # torchsgd8's AVX2 (or default: portable) kernels
  python benchmarks/bench_step.py --prefetch 0            # torchsgd8's kernels without software prefetch
  python benchmarks/bench_step.py --isa avx2 --gather 0   # AVX2 kernels with scalar table loads, not gathers
  python benchmarks/bench_step.py --check-threads         # 8-bit results identical for 1 and 2 threads
  python benchmarks/bench_step.py --memory-check          # largest allocation during a step
  python benchmarks/bench_step.py --device cuda           # on the GPU: 1M, 16M, 64M, 256M params
  python benchmarks/bench_step.py --device cuda --configs 64M:single,1M:mixed   # these (size, layout) pairs
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import torchsgd8

try:
    import bitsandbytes as bnb
except Exception:  # not installed, or fails to load: its methods are simply unavailable
    bnb = None

LR = 0.01
MOMENTUM = 0.9
# torchsgd8 reads these once per process: --isa / --prefetch / --gather re-run the benchmark with them set
KERNEL_ENV = {"isa": "TORCHSGD8_CPU_ISA", "prefetch": "TORCHSGD8_CPU_PREFETCH", "gather": "TORCHSGD8_CPU_GATHER"}
ON_OFF = {True: "on", False: "off"}
DEFAULT_JSON = Path(__file__).resolve().parent / "out" / "bench.json"
SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30}
AXPY_BYTES_PER_ELEMENT = 12
COPY_BYTES_PER_ELEMENT = 8
DEFAULT_SIZES = {"cpu": [2**20, 16 * 2**20, 64 * 2**20], "cuda": [2**20, 16 * 2**20, 64 * 2**20, 256 * 2**20]}
DEFAULT_LAYOUTS = ["mixed", "single"]
CUDA_STEPS_PER_REP = 10
# Options that set up the CPU kernels or torch's CPU threads: meaningless for a GPU step.
CPU_ONLY_OPTIONS = {"threads": "--threads", "isa": "--isa", "prefetch": "--prefetch", "gather": "--gather",
                    "check_threads": "--check-threads", "memory_check": "--memory-check"}
# Where the 8-bit step is judged against the copy roofline, torch's fused step and bitsandbytes' (--device cuda).
GPU_TARGET_MIN_SIZE = 64 * 2**20
GPU_TARGET_COPY_FRACTION = 0.85

Step = Callable[[], object]


# ---- methods ---------------------------------------------------------------------------------------

def _torch_sgd(**impl) -> Callable:
    def build(params):
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, **impl)
        return opt, opt.step
    return build


def _torch_compiled(params):
    # torch.optim.SGD's step graph-breaks, so fullgraph=True would fail: default mode.
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, foreach=True)

    def step():
        opt.step()
    return opt, torch.compile(step)


def _torchsgd8(cls, compiled: bool, mode: Optional[str] = None) -> Callable:
    def build(params):
        opt = cls(params, lr=LR, momentum=MOMENTUM)
        return opt, torch.compile(opt.step, fullgraph=True, mode=mode) if compiled else opt.step
    return build


def _bnb(name: str) -> Callable:
    def build(params):
        opt = getattr(bnb.optim, name)(params, lr=LR, momentum=MOMENTUM)
        return opt, opt.step
    return build


# name -> builder(params) -> (optimizer, step callable). Order = column order of the tables.
METHODS: dict[str, Callable] = {
    "torch_forloop": _torch_sgd(foreach=False),
    "torch_foreach": _torch_sgd(foreach=True),
    "torch_fused": _torch_sgd(fused=True),
    "torch_compiled": _torch_compiled,
    "torchsgd8_fp32": _torchsgd8(torchsgd8.SGD32bit, compiled=False),
    "torchsgd8_8bit": _torchsgd8(torchsgd8.SGD8bit, compiled=False),
    "torchsgd8_fp32_compiled": _torchsgd8(torchsgd8.SGD32bit, compiled=True),
    "torchsgd8_8bit_compiled": _torchsgd8(torchsgd8.SGD8bit, compiled=True),
    # CUDA graphs: Inductor records the compiled step once and replays it
    "torchsgd8_fp32_cudagraph": _torchsgd8(torchsgd8.SGD32bit, compiled=True, mode="reduce-overhead"),
    "torchsgd8_8bit_cudagraph": _torchsgd8(torchsgd8.SGD8bit, compiled=True, mode="reduce-overhead"),
    "bnb_sgd32bit": _bnb("SGD32bit"),
    "bnb_sgd8bit": _bnb("SGD8bit"),
}
COMPILED = {"torch_compiled", "torchsgd8_fp32_compiled", "torchsgd8_8bit_compiled", "torchsgd8_fp32_cudagraph",
            "torchsgd8_8bit_cudagraph"}
CUDA_ONLY_METHODS = {"torchsgd8_fp32_cudagraph", "torchsgd8_8bit_cudagraph"}
# Run on the GPU only when asked for: one launch per tensor and op, which says little about the GPU.
CUDA_NOT_BY_DEFAULT = {"torch_forloop"}
# Every optimizer's step runs through the same torch.optim wrapper function, which dynamo recompiles for
# each optimizer object and again once its state exists. Past the limit dynamo silently runs eager.
RECOMPILE_LIMIT = 64


def available_methods(device: str = "cpu") -> list[str]:
    skip = CUDA_NOT_BY_DEFAULT if device == "cuda" else CUDA_ONLY_METHODS
    return [m for m in METHODS if (bnb is not None or not m.startswith("bnb_")) and m not in skip]


# ---- layouts ---------------------------------------------------------------------------------------

def _block_shapes(d: int) -> list[tuple[int, ...]]:
    """One GPT-style transformer block: layer norms, attention (qkv, out) and MLP (d -> 4d -> d)."""
    return [
        (d,), (d,),                 # ln1 weight, bias
        (3 * d, d), (3 * d,),       # qkv projection
        (d, d), (d,),               # attention output projection
        (d,), (d,),                 # ln2 weight, bias
        (4 * d, d), (4 * d,),       # MLP up
        (d, 4 * d), (d,),           # MLP down
    ]


def transformer_shapes(total: int) -> list[tuple[int, ...]]:
    """A transformer-like mix of tensors with exactly ``total`` elements.

    d_model is the largest multiple of 64 that leaves at least 15% of the total to the token embedding,
    with d_model / 64 layers (GPT-2's proportions). The embedding (rows x d) takes the remaining elements;
    a final vector holds the few (< d) that do not fill a row. Totals too small for d = 64 get one tensor.
    """
    best = None
    d = 64
    while True:
        body = [s for _ in range(max(1, d // 64)) for s in _block_shapes(d)] + [(d,), (d,)]  # + final LN
        if total - sum(math.prod(s) for s in body) < 0.15 * total:
            break
        best = (d, body)
        d += 64
    if best is None:
        return [(total,)]
    return _with_embedding(total, *best)


def deep_shapes(total: int, d: int = 128) -> list[tuple[int, ...]]:
    """Many small tensors with exactly ``total`` elements: as many d_model = 128 blocks (12 tensors each) as
    fit in 85% of the total (16M: 71 blocks, 855 tensors), the rest a token embedding. What a step costs per
    tensor outside the kernels. Totals too small for one block get one tensor."""
    block = _block_shapes(d)
    layers = int(0.85 * total) // sum(math.prod(s) for s in block)
    if layers == 0:
        return [(total,)]
    return _with_embedding(total, d, [s for _ in range(layers) for s in block] + [(d,), (d,)])


def _with_embedding(total: int, d: int, body: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """A (rows, d) token embedding with the elements `body` leaves of `total`, then `body`, then a vector of
    the few (< d) that do not fill a row."""
    rows, rest = divmod(total - sum(math.prod(s) for s in body), d)
    return [(rows, d)] + body + ([(rest,)] if rest else [])


LAYOUTS = {"mixed": transformer_shapes, "single": lambda total: [(total,)], "deep": deep_shapes}


def layout_shapes(layout: str, total: int) -> list[tuple[int, ...]]:
    return LAYOUTS[layout](total)


# ---- per-method accounting ---------------------------------------------------------------------------

def ideal_bytes(opt: torch.optim.Optimizer, params: list[Tensor]) -> int:
    """Bytes a step must move, by the formulas in the module docstring."""
    total = 0
    for p in params:
        n, size = p.numel(), p.element_size()
        state = opt.state.get(p, {})
        buffer = state.get("momentum_buffer", state.get("state1"))  # torch / torchsgd8, bitsandbytes
        if isinstance(buffer, Tensor) and buffer.dtype == torch.uint8:
            total += (3 * size + 2) * n + 8 * math.ceil(n / 256)
        else:  # bitsandbytes keeps a float32 buffer for 16-bit params
            buffer_size = buffer.element_size() if isinstance(buffer, Tensor) else size
            total += (3 * size + 2 * buffer_size) * n
    return total


def state_nbytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in the optimizer state; a tensor shared by several params counts once."""
    seen = set()
    total = 0
    for param_state in opt.state.values():
        for value in param_state.values():
            if isinstance(value, Tensor) and (value.data_ptr(), value.nbytes) not in seen:
                seen.add((value.data_ptr(), value.nbytes))
                total += value.nbytes
    return total


# ---- the benchmark -----------------------------------------------------------------------------------

@dataclass
class Entry:
    """One timed thing in a round-robin: a method's step, or the roofline."""
    name: str
    step: Step
    opt: Optional[torch.optim.Optimizer] = None
    params: list[Tensor] = field(default_factory=list)
    warmup_s: list[float] = field(default_factory=list)
    times_s: list[float] = field(default_factory=list)
    error: Optional[str] = None
    note: Optional[str] = None  # --device cuda: what the row's numbers do not say (CUDA graphs not used)


@dataclass(frozen=True)
class Roofline:
    """The stream timed beside the methods, moving `bytes_per_element` bytes per model element."""
    name: str
    bytes_per_element: int


ROOFLINES = {"cpu": Roofline("axpy", AXPY_BYTES_PER_ELEMENT), "cuda": Roofline("copy", COPY_BYTES_PER_ELEMENT)}


def _timed(step: Step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


class CpuClock:
    """Host wall-clock time."""

    def warmup(self, step: Step) -> float:
        return _timed(step)

    def per_step(self, step: Step, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps


class CudaClock:
    """Device time between two CUDA events on the current stream around `steps` consecutive steps. The GPU is
    idle when the first event is recorded, so steps that the host issues more slowly than the GPU runs them
    are timed at the host's pace (small, launch-bound steps)."""

    def __init__(self):
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def warmup(self, step: Step) -> float:
        """Host time of one step until the GPU has finished it (compilation included)."""
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    def per_step(self, step: Step, steps: int) -> float:
        torch.cuda.synchronize()
        self._start.record()
        for _ in range(steps):
            step()
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1e3 / steps


class _MessageList(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__()
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().strip().splitlines()
        self.messages.append(lines[0] if lines else "")


class CudagraphSkips:
    """While active, counts the graphs for which Inductor declined CUDA graphs (mode="reduce-overhead") and
    keeps the reasons it logged; the compiled step then runs without them."""

    # the artifact logger torch._inductor.cudagraph_utils writes each skip's reason to (off by default)
    LOGGER = "torch._inductor.cudagraph_utils.__cudagraphs"

    def __enter__(self) -> "CudagraphSkips":
        from torch._dynamo.utils import counters

        self._counters = counters["inductor"]
        self._before = self._counters["cudagraph_skips"]
        self.count = 0
        self.reasons: list[str] = []
        self._handler = _MessageList(self.reasons)
        logging.getLogger(self.LOGGER).addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger(self.LOGGER).removeHandler(self._handler)
        self.count = self._counters["cudagraph_skips"] - self._before

    def note(self) -> Optional[str]:
        if not self.count:
            return None
        reasons = "; ".join(dict.fromkeys(self.reasons)) or "no reason logged (TORCH_LOGS=cudagraphs prints it)"
        return f"CUDA graphs not used ({self.count} graph(s) skipped): {reasons}"[:400]


def _error_text(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]


def run_config(total: int, layout: str, methods: list[str], reps: int, warmup: int, seed: int,
               dtype: torch.dtype = torch.float32, device: str = "cpu", steps_per_rep: int = 1) -> dict:
    """Times every method on one (size, layout) with params and grads of `dtype` on `device` (cpu or cuda);
    everything it allocates is freed on return."""
    torch._dynamo.reset()  # fresh compile caches per config: recompile limits, cached graphs, CUDA graphs
    gen = torch.Generator(device).manual_seed(seed)
    shapes = layout_shapes(layout, total)
    # shared, read-only for every method
    grads = [torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes]
    init = [torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes]

    entries = []
    for name in methods:
        params = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(params, grads):
            p.grad = g
        entry = Entry(name, step=lambda: None, params=params)
        try:
            entry.opt, entry.step = METHODS[name](params)
        except Exception as e:
            entry.error = _error_text(e)
        entries.append(entry)
    del init
    roofline = ROOFLINES[device]
    a, b = torch.randn(total, generator=gen, device=device), torch.randn(total, generator=gen, device=device)
    if device == "cpu":
        entries.append(Entry(roofline.name, step=lambda: a.add_(b, alpha=1e-3)))
    else:
        entries.append(Entry(roofline.name, step=lambda: a.copy_(b)))
    clock = CudaClock() if device == "cuda" else CpuClock()

    for entry in entries:  # warm-up, including compilation
        watch = CudagraphSkips() if entry.name in CUDA_ONLY_METHODS else contextlib.nullcontext()
        with watch:
            for _ in range(warmup):
                if entry.error is None:
                    try:
                        entry.warmup_s.append(clock.warmup(entry.step))
                    except Exception as e:
                        entry.error = _error_text(e)
        if isinstance(watch, CudagraphSkips):
            entry.note = watch.note()

    live = [e for e in entries if e.error is None]
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps):
            start = rep % len(live)
            for entry in live[start:] + live[:start]:
                if entry.error is None:
                    try:
                        entry.times_s.append(clock.per_step(entry.step, steps_per_rep))
                    except Exception as e:
                        entry.error = _error_text(e)
    finally:
        gc.enable()

    result = summarize(total, layout, shapes, entries, dtype, roofline, device)
    del entries, live, grads, a, b
    gc.collect()
    torch._dynamo.reset()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def summarize(total: int, layout: str, shapes: list, entries: list[Entry], dtype: torch.dtype,
              roofline: Roofline = ROOFLINES["cpu"], device: str = "cpu") -> dict:
    reference = next(e for e in entries if e.name == roofline.name)
    if reference.error is not None:  # nothing to score against; on a GPU, often an earlier method's fault
        raise RuntimeError(f"the {roofline.name} roofline failed: {reference.error}")
    reference_s = statistics.median(reference.times_s)
    bandwidth = roofline.bytes_per_element * total / reference_s  # bytes per second
    medians = {e.name: statistics.median(e.times_s) for e in entries if e.times_s and e.error is None}
    fused_s = medians.get("torch_fused")

    rows = []
    for e in entries:
        if e.name == roofline.name:
            continue
        row = {"method": e.name, "error": e.error}
        if device != "cpu":
            row["note"] = e.note
        if e.error is None:
            median_s = medians[e.name]
            nbytes = ideal_bytes(e.opt, e.params)
            row.update(
                median_ms=median_s * 1e3,
                min_ms=min(e.times_s) * 1e3,
                times_ms=[t * 1e3 for t in e.times_s],
                warmup_ms=[t * 1e3 for t in e.warmup_s],
                ideal_bytes=nbytes,
                ideal_bytes_per_param=nbytes / total,
                gbps=nbytes / median_s / 1e9,
                x_roofline=median_s / (nbytes / bandwidth),
                x_fused=median_s / fused_s if fused_s else None,
                state_bytes_per_param=state_nbytes(e.opt) / total,
                compile_s=(max(0.0, sum(e.warmup_s) - len(e.warmup_s) * median_s)
                           if e.name in COMPILED else None),
            )
        rows.append(row)
    return {
        "size": total,
        "dtype": str(dtype).removeprefix("torch."),
        "layout": layout,
        "n_tensors": len(shapes),
        "shapes": [list(s) for s in shapes],
        roofline.name: {"median_ms": reference_s * 1e3, "gbps": bandwidth / 1e9,
                        "times_ms": [t * 1e3 for t in reference.times_s]},
        "methods": rows,
    }


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(config: dict, threads: int, device: str = "cpu", steps_per_rep: int = 1) -> None:
    cuda = device == "cuda"
    roofline = ROOFLINES[device].name
    reference = config[roofline]
    where = f"{steps_per_rep} steps per timing" if cuda else f"{threads} threads"
    print(f"\n== {format_size(config['size'])} {config['dtype']} params ({config['size']:,}), layout={config['layout']} "
          f"({config['n_tensors']} tensors), {where}; "
          f"{roofline} roofline {reference['median_ms']:.3f} ms = {reference['gbps']:.1f} GB/s ==")
    header = (f"{'method':<24} {'ms/step':>9} {'min ms':>9} {'GB/s':>7} {'x roofline':>10} "
              + (f"{'% copy':>7} " if cuda else "")
              + f"{'x fused':>8} {'state B/param':>13} {'compile s':>9}")
    print(header)
    print("-" * len(header))
    for row in config["methods"]:
        if row["error"]:
            print(f"{row['method']:<24} failed: {row['error']}")
        else:
            print(f"{row['method']:<24} {row['median_ms']:>9.3f} {row['min_ms']:>9.3f} {row['gbps']:>7.1f} "
                  f"{row['x_roofline']:>10.2f} " + (f"{100 / row['x_roofline']:>7.1f} " if cuda else "")
                  + f"{_fmt(row['x_fused'], '.2f'):>8} "
                  f"{row['state_bytes_per_param']:>13.3f} {_fmt(row['compile_s'], '.1f'):>9}")
        if row.get("note"):
            print(f"{'':<24} note: {row['note']}")
    if cuda:
        for line in gpu_target_lines(config):
            print(line)


def gpu_target_lines(config: dict) -> list[str]:
    """The GPU targets of torchsgd8's 8-bit step at >= 64M params: at least 85 % of the copy bandwidth (ideal
    bytes / time), faster than torch's fused SGD and than bitsandbytes' SGD8bit on the same GPU."""
    if config["size"] < GPU_TARGET_MIN_SIZE:
        return []
    rows = {row["method"]: row for row in config["methods"] if not row["error"]}
    lines = []
    for name in ("torchsgd8_8bit", "torchsgd8_8bit_compiled", "torchsgd8_8bit_cudagraph"):
        row = rows.get(name)
        if row is None:
            continue
        fraction = 1 / row["x_roofline"]
        verdict = "met" if fraction >= GPU_TARGET_COPY_FRACTION else "MISSED"
        parts = [f"{100 * fraction:.1f} % of copy bandwidth ({verdict}, >= {100 * GPU_TARGET_COPY_FRACTION:.0f} %)"]
        for other in ("torch_fused", "bnb_sgd8bit"):
            if other in rows:
                ratio = row["median_ms"] / rows[other]["median_ms"]
                parts.append(f"{ratio:.2f}x {other}'s time ({'met' if ratio < 1 else 'MISSED'}, < 1)")
            else:
                parts.append(f"{other} not measured")
        lines.append(f"target {name}: " + "; ".join(parts))
    return lines


# ---- machine info ----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torchsgd8_version": torchsgd8.__version__,
        "torchsgd8_cpu_isa": torchsgd8._C.cpu_isa(),
        "torchsgd8_cpu_prefetch": torchsgd8._C.cpu_prefetch(),
        "torchsgd8_cpu_gather": torchsgd8._C.cpu_gather(),
        "bitsandbytes_version": getattr(bnb, "__version__", None),
        "python_version": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def triton_version() -> Optional[str]:
    try:
        import triton
    except Exception:
        return None
    return triton.__version__


def gpu_info() -> dict:
    """The current CUDA device and the software that drives it."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu_name": props.name,
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_multiprocessors": props.multi_processor_count,
        "gpu_memory_gib": props.total_memory / 2**30,
        "gpu_l2_cache_mib": getattr(props, "L2_cache_size", 0) / 2**20,
        "cuda_version": torch.version.cuda,
        "triton_version": triton_version(),
    }


# ---- correctness and memory checks --------------------------------------------------------------------

def _run_steps(cls, shapes, thread_count: int, steps: int = 4) -> list[Tensor]:
    """Params and state tensors after ``steps`` steps with fresh (seeded) gradients each step."""
    torch.set_num_threads(thread_count)
    gen = torch.Generator().manual_seed(1234)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = cls(params, lr=LR, momentum=MOMENTUM)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    state = [v for p in params for v in opt.state[p].values() if isinstance(v, Tensor)]
    return [p.detach() for p in params] + state


def check_threads() -> bool:
    """torchsgd8's results must be bit-identical whatever the thread count (8-bit and fp32)."""
    default_threads = torch.get_num_threads()
    counts = sorted({1, 2, default_threads})
    # odd sizes: partial last blocks; one tensor big enough to be split across threads; one kept fp32
    shapes = [((1 << 20) + 100,), (1000, 257), (300,)]
    ok = True
    try:
        for cls in (torchsgd8.SGD8bit, torchsgd8.SGD32bit):
            reference = _run_steps(cls, shapes, counts[0])
            for n in counts[1:]:
                other = _run_steps(cls, shapes, n)
                same = all(torch.equal(x, y) for x, y in zip(reference, other))
                ok &= same
                print(f"check-threads: {cls.__name__} with {counts[0]} vs {n} threads: "
                      f"{'bit-identical' if same else 'DIFFERENT'}")
    finally:
        torch.set_num_threads(default_threads)
    return ok


def _largest_allocation(step: Step, steps: int) -> int:
    """Largest single CPU allocation made while running ``steps`` steps, from torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        for _ in range(steps):
            step()
    events = prof.profiler.kineto_results.events()
    return max((e.nbytes() for e in events if e.name() == "[memory]"), default=0)


def _peak_rss_growth(step: Step, steps: int) -> Optional[int]:
    """Growth of the resident set's high-water mark over ``steps`` steps (Linux; None elsewhere)."""
    def status_kb(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = status_kb("VmRSS")
        for _ in range(steps):
            step()
        return (status_kb("VmHWM") - before) * 1024
    except (OSError, StopIteration):
        return None


def memory_check(total: int, layouts: list[str], steps: int = 3) -> None:
    """Reports the largest allocation during steady-state steps (after the first step, which allocates
    the state); it should be tiny next to the parameters."""
    print(f"\nmemory-check: {format_size(total)} params, {steps} steps after the first")
    header = (f"{'layout':<8} {'method':<16} {'param MB':>9} {'state MB':>9} {'1st step max alloc':>18} "
              f"{'later steps max alloc':>21} {'peak RSS growth':>15}")
    print(header)
    print("-" * len(header))
    for layout in layouts:
        gen = torch.Generator().manual_seed(0)
        for name, cls in (("torchsgd8_fp32", torchsgd8.SGD32bit), ("torchsgd8_8bit", torchsgd8.SGD8bit)):
            params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in layout_shapes(layout, total)]
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt = cls(params, lr=LR, momentum=MOMENTUM)
            first = _largest_allocation(opt.step, 1)
            largest = _largest_allocation(opt.step, steps)
            rss = _peak_rss_growth(opt.step, steps)
            param_mb = sum(p.nbytes for p in params) / 2**20
            print(f"{layout:<8} {name:<16} {param_mb:>9.1f} {state_nbytes(opt) / 2**20:>9.1f} "
                  f"{format_bytes(first):>18} {format_bytes(largest):>21} "
                  f"{format_bytes(rss) if rss is not None else 'n/a':>15}")
            del params, opt
            gc.collect()


# ---- command line ----------------------------------------------------------------------------------

def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = SUFFIXES.get(text[-1:], 1)
    number = float(text[:-1] if text[-1:] in SUFFIXES else text)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text}")
    return int(number * scale)


def format_size(n: int) -> str:
    for suffix, scale in sorted(SUFFIXES.items(), key=lambda kv: -kv[1]):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def format_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB" if n >= 2**10 else f"{n} B"


def _comma_list(allowed: list[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in items if s not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return items
    return parse


def parse_configs(text: str) -> list[tuple[int, str]]:
    configs = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        size, sep, layout = item.partition(":")
        if not sep or layout not in LAYOUTS:
            raise argparse.ArgumentTypeError(f"expected SIZE:LAYOUT with LAYOUT one of {', '.join(LAYOUTS)}, "
                                             f"got {item!r}")
        configs.append((parse_size(size), layout))
    return configs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where params, grads and state live (default cpu); cuda: the current CUDA device")
    parser.add_argument("--sizes", type=lambda s: [parse_size(x) for x in s.split(",")], default=None,
                        help="total parameter counts, K/M/G = 2^10/2^20/2^30 (default 1M,16M,64M; "
                             "with --device cuda 1M,16M,64M,256M)")
    parser.add_argument("--layouts", type=_comma_list(list(LAYOUTS)), default=None,
                        help="mixed: transformer-like tensors; single: one tensor; deep: many small tensors "
                             "(default mixed,single)")
    parser.add_argument("--configs", type=parse_configs, default=None,
                        help="SIZE:LAYOUT pairs, run in this order instead of every --sizes x --layouts "
                             "(e.g. 64M:single,1M:mixed)")
    parser.add_argument("--methods", type=_comma_list(list(METHODS)), default=None,
                        help=f"comma-separated, default all available: {', '.join(METHODS)}")
    parser.add_argument("--reps", type=int, default=10, help="timed steps per method (default 10)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first; compiled methods compile here (default 3)")
    parser.add_argument("--steps-per-rep", type=int, default=None,
                        help=f"--device cuda: consecutive steps timed between two CUDA events per repetition "
                             f"(default {CUDA_STEPS_PER_REP})")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: configurations not started by then are skipped (and listed in the JSON); "
                             "default: no limit")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="params and grads (default float32; the axpy roofline stays float32)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="use the usual Inductor cache (default: a fresh one, so compile times are cold)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    parser.add_argument("--isa", choices=["default", "avx2", "avx512"], default=None,
                        help=f"re-run with {KERNEL_ENV['isa']}=ISA: torchsgd8's kernels for that instruction "
                             "set (default: the widest this CPU runs)")
    parser.add_argument("--prefetch", choices=["0", "1"], default=None,
                        help=f"re-run with {KERNEL_ENV['prefetch']}=0|1: the kernels' software prefetch (8-bit state, 16-bit params) "
                             "off or on (default: on for Intel CPUs)")
    parser.add_argument("--gather", choices=["0", "1"], default=None,
                        help=f"re-run with {KERNEL_ENV['gather']}=0|1: the AVX2 kernels' table reads by scalar "
                             "loads or by gathers (default: gathers on Intel CPUs where they are fast)")
    parser.add_argument("--check-threads", action="store_true",
                        help="only check that torchsgd8 results are bit-identical for 1 and 2 threads")
    parser.add_argument("--memory-check", action="store_true",
                        help="only report the largest allocation during a torchsgd8 step (largest --sizes)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 1:
        parser.error("--reps and --warmup must be >= 1")
    if args.configs is not None and (args.sizes is not None or args.layouts is not None):
        parser.error("--configs replaces --sizes and --layouts; give one or the other")
    if args.device == "cuda":
        given = [flag for option, flag in CPU_ONLY_OPTIONS.items() if getattr(args, option) not in (None, False)]
        if given:
            parser.error(f"{', '.join(given)}: CPU-only (torchsgd8's CPU kernels and torch's CPU threads); "
                         f"not with --device cuda")
        if args.steps_per_rep is None:
            args.steps_per_rep = CUDA_STEPS_PER_REP
        if args.steps_per_rep < 1:
            parser.error("--steps-per-rep must be >= 1")
    else:
        if args.steps_per_rep is not None:
            parser.error("--steps-per-rep: only with --device cuda (on CPU every step is timed alone)")
        args.steps_per_rep = 1
        cuda_only = [m for m in args.methods or [] if m in CUDA_ONLY_METHODS]
        if cuda_only:
            parser.error(f"{', '.join(cuda_only)}: CUDA graphs, only with --device cuda")
    if args.configs is None:
        args.sizes = args.sizes or DEFAULT_SIZES[args.device]
        args.layouts = args.layouts or DEFAULT_LAYOUTS
        args.configs = [(size, layout) for size in args.sizes for layout in args.layouts]
    else:
        args.sizes = list(dict.fromkeys(size for size, _ in args.configs))
        args.layouts = list(dict.fromkeys(layout for _, layout in args.configs))
    if args.methods is None:
        args.methods = available_methods(args.device)
    elif any(m.startswith("bnb_") for m in args.methods) and bnb is None:
        parser.error("bitsandbytes does not import; drop the bnb_* methods")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: no CUDA device (torch {torch.__version__}, built for CUDA "
                     f"{torch.version.cuda or 'none'}; torch.cuda.is_available() is False)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    forced = {env: value for option, env in KERNEL_ENV.items()
              if (value := getattr(args, option)) is not None and os.environ.get(env) != value}
    if forced:  # the kernels are chosen once per process, so the choice needs a fresh one
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], {**os.environ, **forced})
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    if not args.warm_cache:  # read by Inductor when it first compiles
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="bench-step-inductor-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    threads = torch.get_num_threads()
    info = machine_info()
    cache = f"Inductor cache: {'warm' if args.warm_cache else 'fresh'}"
    if args.device == "cuda":
        info.update(gpu_info())
        print(f"{info['gpu_name']} (sm_{info['gpu_capability'].replace('.', '')}, {info['gpu_multiprocessors']} SMs, "
              f"{info['gpu_memory_gib']:.1f} GiB, L2 {info['gpu_l2_cache_mib']:.0f} MiB); host {info['cpu_model']}, "
              f"{info['cpu_count']} cpus; torch {info['torch_version']} (CUDA {info['cuda_version']}), "
              f"triton {info['triton_version']}, torchsgd8 {info['torchsgd8_version']}, "
              f"bitsandbytes {info['bitsandbytes_version']}; {cache}")
    else:
        print(f"{info['cpu_model']}, {info['cpu_count']} cpus, {threads} torch threads; torch {info['torch_version']}, "
              f"torchsgd8 {info['torchsgd8_version']} ({info['torchsgd8_cpu_isa']}, "
              f"prefetch {ON_OFF[info['torchsgd8_cpu_prefetch']]}, gather {ON_OFF[info['torchsgd8_cpu_gather']]}), "
              f"bitsandbytes {info['bitsandbytes_version']}; {cache}")

    if args.check_threads or args.memory_check:
        ok = check_threads() if args.check_threads else True
        if args.memory_check:
            memory_check(max(args.sizes), args.layouts)
        return 0 if ok else 1

    roofline = ROOFLINES[args.device]
    configs, skipped = [], []
    report = {
        "machine": info,
        "settings": {"lr": LR, "momentum": MOMENTUM, "device": args.device, "sizes": args.sizes,
                     "layouts": args.layouts, "configs": [list(c) for c in args.configs], "methods": args.methods,
                     "reps": args.reps, "warmup": args.warmup, "steps_per_rep": args.steps_per_rep,
                     "threads": threads, "seed": args.seed, "dtype": args.dtype,
                     f"{roofline.name}_bytes_per_element": roofline.bytes_per_element,
                     "inductor_cache": "warm" if args.warm_cache else "fresh", "time_budget_s": args.time_budget},
        "results": configs,
        "skipped_configs": skipped,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for total, layout in args.configs:
        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
            skipped.append([total, layout])
            print(f"\n== {format_size(total)} layout={layout}: skipped, past the time budget of "
                  f"{args.time_budget:g} s ==")
            continue
        config = run_config(total, layout, args.methods, args.reps, args.warmup, args.seed,
                            getattr(torch, args.dtype), args.device, args.steps_per_rep)
        print_table(config, threads, args.device, args.steps_per_rep)
        configs.append(config)
        args.json.write_text(json.dumps(report, indent=1))  # so far: a run stopped later keeps these

    args.json.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
