#!/usr/bin/env python
"""GPU checks beside the test suite (run by tools/gpu_check.sh): the public ops under torch.library.opcheck with
CUDA tensors, and SGD8bit / SGD32bit steps on the GPU - eager, torch.compile(fullgraph=True),
torch.compile(fullgraph=True, mode="reduce-overhead") (CUDA graphs recorded by Inductor) and a
torch.cuda.CUDAGraph captured by hand - each checked bit for bit against the same steps on CPU, params and every
state tensor (the Triton kernels and the CPU kernels compute the same bits). Also: a steady-state eager step
does not synchronize with the host (torch.cuda.set_sync_debug_mode("error")).

One line per check (PASS / FAIL / SKIP), a count last; exit status 1 when a check fails.

  python tools/gpu_step_check.py                 # on the current CUDA device
  python tools/gpu_step_check.py --device cpu    # what runs without a GPU: opcheck and the compiled step on CPU
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

import torchsgd8
from torchsgd8 import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_step import CudagraphSkips  # noqa: E402  (one way of noticing Inductor's CUDA-graph skips)

OPS = torch.ops.torchsgd8
LR, MOMENTUM, DAMPENING, WEIGHT_DECAY = 0.01, 0.9, 0.0, 0.001
# 5 steps: Inductor compiles the first step and the steady state; under CUDA graphs it then runs the steady-state
# graph once as warm-up, records it on the next call and replays it on the others
STEPS = 5
CAPTURE_WARMUP_STEPS = 2  # eager steps before a hand capture: state created, then one steady-state step
# one 2-D tensor of whole 256-blocks, one odd vector (partial last block), a matrix whose rows are not whole
# blocks, and a vector under min_8bit_size (fp32 momentum in SGD8bit)
SHAPES = [(512, 384), (4097,), (33, 257), (300,)]
OPTIMIZERS = [(torchsgd8.SGD8bit, torch.float32), (torchsgd8.SGD8bit, torch.bfloat16), (torchsgd8.SGD32bit, torch.float32)]


class Report:
    def __init__(self):
        self.counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def line(self, status: str, name: str, detail: str = "") -> None:
        self.counts[status] += 1
        print(f"{status:<4}  {name}" + (f": {detail}" if detail else ""), flush=True)

    def run(self, name: str, check: Callable[[], Optional[str]]) -> None:
        """check() returns None or a detail (PASS), raises Skip (SKIP), or raises anything else (FAIL)."""
        start = time.perf_counter()
        try:
            detail = check()
        except Skip as e:
            self.line("SKIP", name, str(e))
            return
        except Exception as e:
            last = traceback.extract_tb(e.__traceback__)[-1]
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.line("FAIL", name, f"{type(e).__name__}: {message[:300]} (at {Path(last.filename).name}:{last.lineno})")
            return
        self.line("PASS", name, f"{detail + ', ' if detail else ''}{time.perf_counter() - start:.1f} s")


class Skip(Exception):
    pass


class Mismatch(AssertionError):
    pass


# ---- opcheck -----------------------------------------------------------------------------------------------

def _hyper(device: str, hyper_on_device: bool) -> tuple[Tensor, Tensor]:
    """lr and momentum as the optimizer passes them (0-dim float64 CPU tensors) or on the device."""
    where = device if hyper_on_device else "cpu"
    return (torch.tensor(LR, dtype=torch.float64, device=where),
            torch.tensor(MOMENTUM, dtype=torch.float64, device=where))


def opcheck_samples(device: str, gen: torch.Generator) -> dict[str, tuple]:
    """name -> (op, args, kwargs): each public op on `device` tensors, in the variants the optimizer uses."""
    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    sizes = (1, 257, 1000)
    samples = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for first_step in (False, True):
            for hyper_on_device in (False, True) if device != "cpu" else (False,):
                lr, mom = _hyper(device, hyper_on_device)
                where = "device" if hyper_on_device else "cpu"
                params = [randn(n, dtype=dtype) for n in sizes]
                grads = [randn(n, dtype=dtype) for n in sizes]
                bufs = [randn(n, dtype=dtype) for n in sizes]
                samples[f"sgd_update_ {name} first_step={first_step} hyper={where}"] = (
                    OPS.sgd_update_.default,
                    (params, grads, bufs, lr, mom, 0.1, 0.01, False, False, first_step), {})
                quantized = [ops.quantize_blockwise(randn(n)) for n in sizes]
                # the optimizer keeps the counters on the params' device
                steps = [torch.tensor(3.0, device=device), torch.tensor(0.0, device=device), torch.zeros(1, device=device)]
                samples[f"sgd8bit_update_ {name} first_step={first_step} hyper={where}"] = (
                    OPS.sgd8bit_update_.default,
                    ([randn(n, dtype=dtype) for n in sizes], [randn(n, dtype=dtype) for n in sizes],
                     [c for c, _ in quantized], [a for _, a in quantized], lr, mom, 0.1, 0.01, False, False,
                     first_step), {"steps": steps})
    lr, mom = _hyper(device, False)
    scale = dict(grad_scale=torch.tensor(4.0, device=device), found_inf=torch.tensor(0.0, device=device))
    skip = dict(grad_scale=torch.tensor(4.0, device=device), found_inf=torch.tensor(1.0, device=device))
    for amp, kwargs in (("scale", scale), ("skip", skip)):
        quantized = [ops.quantize_blockwise(randn(n)) for n in sizes]
        samples[f"sgd8bit_update_ float32 amp={amp}"] = (
            OPS.sgd8bit_update_.default,
            ([randn(n) for n in sizes], [randn(n) for n in sizes], [c for c, _ in quantized],
             [a for _, a in quantized], lr, mom, 0.1, 0.01, True, False, False), kwargs)
        samples[f"sgd_update_ float32 amp={amp}"] = (
            OPS.sgd_update_.default,
            ([randn(n) for n in sizes], [randn(n) for n in sizes], [randn(n) for n in sizes], lr, mom, 0.0, 0.0,
             True, True, False), kwargs)
    per_row_values = randn(3, 300)
    samples["sgd8bit_update_ per-row absmax"] = (
        OPS.sgd8bit_update_.default,
        ([randn(3, 300), randn(700)], [randn(3, 300), randn(700)],
         *map(list, zip(ops.quantize_blockwise(per_row_values, per_row=True), ops.quantize_blockwise(randn(700)))),
         lr, mom, 0.1, 0.01, False, False, False), {})
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        samples[f"quantize_blockwise {name}"] = (OPS.quantize_blockwise.default, (randn(33, 65, dtype=dtype),), {})
        samples[f"quantize_blockwise {name} per_row"] = (
            OPS.quantize_blockwise.default, (randn(3, 257, dtype=dtype), True), {})
        codes, absmax = ops.quantize_blockwise(randn(1000))
        samples[f"dequantize_blockwise {name}"] = (OPS.dequantize_blockwise.default, (codes, absmax, dtype), {})
    samples["grads_fit"] = (OPS.grads_fit.default, ([randn(3), randn(2, 5)], [randn(3), randn(2, 5)]), {})
    return samples


# ---- optimizer steps -------------------------------------------------------------------------------------------

def _bits(t: Tensor) -> Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)




def compare(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    """Raises Mismatch naming every tensor (param or state entry) whose bits differ."""
    if got.keys() != want.keys():
        raise Mismatch(f"state entries differ: {sorted(got.keys() ^ want.keys())}")
    bad = []
    for key, expected in want.items():
        actual = got[key]
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            bad.append(f"{key} {actual.dtype}{list(actual.shape)} vs {expected.dtype}{list(expected.shape)}")
            continue
        if not torch.equal(_bits(actual), _bits(expected)):
            a, b = actual.detach().cpu().double().reshape(-1), expected.detach().cpu().double().reshape(-1)
            differ = (a != b) & ~(a.isnan() & b.isnan())
            first = int(differ.nonzero()[0]) if differ.any() else 0
            bad.append(f"{key}: {int(differ.sum())} of {b.numel()} differ, first at {first} "
                       f"({a[first].item():.9g} vs {b[first].item():.9g})")
    if bad:
        raise Mismatch("; ".join(bad[:4]) + (f"; and {len(bad) - 4} more" if len(bad) > 4 else ""))


class Run:
    """One optimizer over params on `device`, fed the same gradients at every step as every other Run."""

    def __init__(self, cls, dtype: torch.dtype, device: str, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype))
                       for s in SHAPES]
        for p in self.params:
            p.grad = torch.zeros_like(p)  # updated in place each step: graph replays read these addresses
        self.opt = cls(self.params, lr=LR, momentum=MOMENTUM, dampening=DAMPENING, weight_decay=WEIGHT_DECAY)
        self.dtype = dtype

    def set_grads(self, step: int) -> None:
        gen = torch.Generator().manual_seed(1000 + step)
        for p in self.params:
            p.grad.copy_(torch.randn(p.shape, generator=gen).to(self.dtype), non_blocking=True)

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for i, p in enumerate(self.params):
            out[f"param {i}"] = p.detach()
            for key, value in self.opt.state.get(p, {}).items():
                if isinstance(value, Tensor):
                    out[f"param {i} state {key!r}"] = value
        return out


def run_steps(run: Run, step: Callable, first: int = 0, last: int = STEPS) -> None:
    for i in range(first, last):
        run.set_grads(i)
        step()


def reference(cls, dtype: torch.dtype) -> dict[str, Tensor]:
    run = Run(cls, dtype, "cpu")
    run_steps(run, run.opt.step)
    return {k: v.clone() for k, v in run.tensors().items()}


def check_eager(cls, dtype, device, want) -> Optional[str]:
    run = Run(cls, dtype, device)
    run_steps(run, run.opt.step)
    compare(run.tensors(), want)
    return None


def check_compiled(cls, dtype, device, want, mode: Optional[str] = None) -> Optional[str]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    run = Run(cls, dtype, device)
    step = torch.compile(run.opt.step, fullgraph=True, mode=mode)
    frames = counters["stats"]["unique_graphs"]
    watch = CudagraphSkips() if mode == "reduce-overhead" else contextlib.nullcontext()
    with watch:
        run_steps(run, step)
    if device == "cuda":
        torch.cuda.synchronize()
    compare(run.tensors(), want)
    if isinstance(watch, CudagraphSkips) and watch.count:
        raise Mismatch(f"results right, but {watch.note()}")
    return f"{counters['stats']['unique_graphs'] - frames} graph(s) compiled for {STEPS} steps"


def check_hand_capture(cls, dtype, device, want) -> Optional[str]:
    """Eager warm-up steps on a side stream, one step captured into a torch.cuda.CUDAGraph, replays after: params,
    state and the step counters (on the device, counted by device code) as after eager steps."""
    run = Run(cls, dtype, device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_steps(run, run.opt.step, 0, CAPTURE_WARMUP_STEPS)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run.opt.step()
    run_steps(run, graph.replay, CAPTURE_WARMUP_STEPS, STEPS)
    torch.cuda.synchronize()
    got = run.tensors()
    compare(got, want)
    return None


def check_no_sync(cls, dtype, device) -> Optional[str]:
    """A steady-state eager step (state created, plans built) issues no synchronizing CUDA call."""
    run = Run(cls, dtype, device)
    run_steps(run, run.opt.step, 0, 2)
    torch.cuda.synchronize()
    before = torch.cuda.get_sync_debug_mode()
    for i in range(2, STEPS):
        run.set_grads(i)
        torch.cuda.set_sync_debug_mode("error")
        try:
            run.opt.step()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    torch.cuda.synchronize()
    return None


def opcheck(op, op_args: tuple, kwargs: dict) -> None:
    torch.library.opcheck(op, op_args, kwargs)  # raises on the first failing utility


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda (default): the current CUDA device; cpu: the checks that need no GPU")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error(f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}); "
                     f"--device cpu runs the checks that need none")
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"gpu_step_check on {where}: torch {torch.__version__}, torchsgd8 {torchsgd8.__version__}", flush=True)
    torch._dynamo.config.recompile_limit = 64
    report = Report()

    gen = torch.Generator().manual_seed(0)
    for name, (op, op_args, kwargs) in opcheck_samples(device, gen).items():
        report.run(f"opcheck {name}", lambda: opcheck(op, op_args, kwargs))

    need_cuda = Skip("needs a CUDA device") if device != "cuda" else None
    captures = []
    for cls, dtype in OPTIMIZERS:
        label = f"{cls.__name__} {str(dtype).removeprefix('torch.')}"
        want = reference(cls, dtype)
        report.run(f"{label} eager == CPU", lambda: check_eager(cls, dtype, device, want))
        report.run(f"{label} compiled fullgraph == CPU", lambda: check_compiled(cls, dtype, device, want))

        def cudagraph():
            if need_cuda:
                raise need_cuda
            return check_compiled(cls, dtype, device, want, mode="reduce-overhead")

        report.run(f"{label} compiled reduce-overhead (CUDA graphs) == CPU", cudagraph)

        def no_sync():
            if need_cuda:
                raise need_cuda
            return check_no_sync(cls, dtype, device)

        report.run(f"{label} steady-state eager step does not synchronize", no_sync)
        captures.append((label, cls, dtype, want))
    # last: a failed capture can leave the CUDA context unusable for whatever follows it
    for label, cls, dtype, want in captures:
        def capture():
            if need_cuda:
                raise need_cuda
            return check_hand_capture(cls, dtype, device, want)

        report.run(f"{label} torch.cuda.CUDAGraph capture and replay == CPU", capture)

    counts = report.counts
    print(f"gpu_step_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
