"""Numerics of torchsgd8.SGD against torch.optim.SGD (torch's default for-loop path on CPU).

Error metric used throughout (per tensor, params and momentum buffers alike):

    rel_err(ours, ref) = max|ours - ref| / max(max|ref|, tiny)

computed in float64. fp32 must be within 1e-6 and fp64 within 1e-12 (the AVX2 and AVX512 kernels are in
fact bitwise identical to torch for both). bf16/fp16 params are compared against a float32 reference that
mirrors what our kernel does: torch.optim.SGD on float32 copies whose params and buffers are rounded to
the low dtype after every step (see LOW_PRECISION_TOL).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from torch import nn

import torchsgd8

from helpers import set_same_grads

STEPS = 100
LR = 0.05
SEED = 1234

# One optimizer holds one param of each of these shapes, so a test covers all shapes at once.
# "noncontig" is a (33, 65) transposed view of a (65, 33) tensor.
SHAPES = [(), (0,), (1,), (255,), (256,), (257,), (4097,), (33, 65), "noncontig"]


def _configs():
    """Every valid hyperparameter combination of the matrix (nesterov needs momentum and no dampening)."""
    out = []
    for momentum in (0.0, 0.9):
        for nesterov in (False, True):
            if nesterov and momentum == 0:
                continue
            for dampening in (0.0, 0.3):
                if nesterov and dampening != 0:
                    continue
                for weight_decay in (0.0, 0.01):
                    for maximize in (False, True):
                        out.append(dict(momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                        nesterov=nesterov, maximize=maximize))
    return out


def _config_id(c):
    return (f"m{c['momentum']}-d{c['dampening']}-wd{c['weight_decay']}"
            f"{'-nesterov' if c['nesterov'] else ''}{'-max' if c['maximize'] else ''}")


CONFIGS = _configs()
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW_DTYPES = (torch.bfloat16, torch.float16)

# Tolerance of the bf16/fp16 comparison. Ours and the mirrored reference do the same float32 arithmetic
# and round to the low dtype once per step; they can only differ when a float32 result that is a few
# float32 ulps apart (a fused vs unfused multiply-add in a scalar tail) falls on different sides of a
# low-dtype rounding boundary: one low-dtype ulp at that element's magnitude. Such a flip carries on
# additively (SGD is affine in the params for given grads; the momentum buffer decays it), so two ulps
# of the low dtype relative to the tensor's largest magnitude bounds it: eps is the gap above 1.0,
# i.e. one ulp relative to a value in [1, 2).
LOW_PRECISION_TOL = {dt: 2 * torch.finfo(dt).eps for dt in LOW_DTYPES}
EXACT_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if ref.numel() == 0:
        return 0.0
    a, b = ours.detach().double(), ref.detach().double()
    scale = max(b.abs().max().item(), torch.finfo(torch.float64).tiny)
    return (a - b).abs().max().item() / scale


def _initial_tensors(dtype, gen):
    out = []
    for shape in SHAPES:
        if shape == "noncontig":
            out.append(torch.randn(65, 33, generator=gen).to(dtype).t())
        else:
            out.append(torch.randn(shape, generator=gen).to(dtype))
    return out


def run_against_torch(config, dtype, steps=STEPS, seed=SEED):
    """Trains the SHAPES params `steps` steps with ours and with the reference on the same random grads;
    returns the worst rel_err over all params and momentum buffers at the end, and a list of problems
    in the state layout (empty when fine)."""
    gen = torch.Generator().manual_seed(seed)
    init = _initial_tensors(dtype, gen)
    low = dtype in LOW_DTYPES
    ours = [nn.Parameter(t.clone()) for t in init]
    assert not ours[-1].is_contiguous()
    ref = [nn.Parameter(t.float() if low else t.clone()) for t in init]
    opt = torchsgd8.SGD(ours, lr=LR, **config)
    ref_opt = torch.optim.SGD(ref, lr=LR, foreach=False, **config)
    for _ in range(steps):
        for p, r in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad = g
            r.grad = g.float() if low else g.clone()
        opt.step()
        ref_opt.step()
        if low:  # mirror our kernel: fp32 math, one rounding of param and buffer per step
            with torch.no_grad():
                for r in ref:
                    r.copy_(r.to(dtype).float())
                    buf = ref_opt.state[r].get("momentum_buffer")
                    if buf is not None:
                        buf.copy_(buf.to(dtype).float())
    worst = 0.0
    problems = []
    for i, (p, r) in enumerate(zip(ours, ref)):
        if p.dtype != dtype:
            problems.append(f"param {i} changed dtype to {p.dtype}")
        if p.stride() != init[i].stride():
            problems.append(f"param {i} changed strides")
        worst = max(worst, rel_err(p, r))
        ref_buf = ref_opt.state[r].get("momentum_buffer")
        our_buf = opt.state[p].get("momentum_buffer")
        if (ref_buf is None) != (our_buf is None):
            problems.append(f"param {i}: momentum_buffer presence differs (ours {our_buf is not None})")
        elif ref_buf is not None:
            if our_buf.dtype != dtype or our_buf.shape != p.shape:
                problems.append(f"param {i}: buffer is {our_buf.dtype}{tuple(our_buf.shape)}")
            worst = max(worst, rel_err(our_buf, ref_buf))
    return worst, problems


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_matches_torch_sgd(config, dtype):
    worst, problems = run_against_torch(config, dtype)
    assert not problems
    tol = LOW_PRECISION_TOL.get(dtype, EXACT_TOL.get(dtype))
    assert worst <= tol, f"rel_err {worst:.3e} > {tol:.1e}"
    if torchsgd8._C.cpu_isa() in ("AVX2", "AVX512") and dtype in EXACT_TOL:
        # documented in csrc/sgd_rule.h: same FMAs in the same order as ATen -> the very same bits
        assert worst == 0.0


# ---- the other kernel sets, in a subprocess: TORCHSGD8_CPU_ISA is read once per process ------------

# fp32/fp64: every combination; bf16/fp16: the momentum ones (the low-dtype load/store paths).
PORTABLE_CASES = [(c, dt) for c in CONFIGS for dt in (torch.float32, torch.float64)] + [
    (c, dt) for c in CONFIGS if c["momentum"] and not c["maximize"] for dt in LOW_DTYPES
]


def _portable_main():
    results = []
    for i, (config, dtype) in enumerate(PORTABLE_CASES):
        worst, problems = run_against_torch(config, dtype, steps=30)
        results.append({"case": i, "err": worst, "problems": problems})
    print(json.dumps({"isa": torchsgd8._C.cpu_isa(), "results": results}))


@pytest.mark.parametrize("isa", ["default", "avx2", "avx512"])
def test_other_kernel_sets_match_torch(isa, run_with_kernel_set):
    proc = run_with_kernel_set(isa, [sys.executable, __file__, "--portable"], timeout=300)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["isa"] == isa.upper()
    assert [r["case"] for r in report["results"]] == list(range(len(PORTABLE_CASES)))
    for r in report["results"]:
        config, dtype = PORTABLE_CASES[r["case"]]
        assert not r["problems"], (config, dtype, r["problems"])
        tol = LOW_PRECISION_TOL[dtype] if dtype in LOW_DTYPES else 1e-6
        if isa != "default" and dtype in EXACT_TOL:
            tol = 0.0  # the SIMD kernels use torch's FMAs in torch's order
        assert r["err"] <= tol, (_config_id(config), dtype, r["err"])


def test_default_isa_on_this_machine():
    # Without the override the widest kernels this CPU supports are used; tell which one we tested.
    assert torchsgd8._C.cpu_isa() in ("DEFAULT", "AVX2", "AVX512")
    if os.environ.get("TORCHSGD8_CPU_ISA") is None:
        import platform

        flags = set()
        if os.path.exists("/proc/cpuinfo"):
            for line in open("/proc/cpuinfo"):
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
        if platform.machine() in ("x86_64", "AMD64"):
            if {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vbmi"} <= flags:
                assert torchsgd8._C.cpu_isa() == "AVX512"
            elif {"avx2", "fma", "f16c"} <= flags:
                assert torchsgd8._C.cpu_isa() == "AVX2"


# ---- non-finite gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    dict(momentum=0.0),
    dict(momentum=0.0, weight_decay=0.01, maximize=True),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_nonfinite_gradients_propagate_like_torch(config, gen):
    shapes = [(300,), (17, 19), ()]
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [nn.Parameter(t.clone()) for t in init]
    ref = [nn.Parameter(t.clone()) for t in init]
    opt = torchsgd8.SGD(ours, lr=LR, **config)
    ref_opt = torch.optim.SGD(ref, lr=LR, foreach=False, **config)
    specials = (float("nan"), float("inf"), float("-inf"))
    seen_nan = seen_inf = False
    for step in range(6):
        for k, (p, r) in enumerate(zip(ours, ref)):
            g = torch.randn(p.shape, generator=gen)
            flat = g.view(-1)
            if step in (1, 3):  # a few non-finite entries at varied (SIMD body and tail) positions
                n = flat.numel()
                for j, idx in enumerate((step, n // 2 + step, n - 1 - step)):
                    flat[idx % n] = specials[(j + k) % 3]
            p.grad, r.grad = g, g.clone()
        opt.step()
        ref_opt.step()
        for p, r in zip(ours, ref):
            assert torch.equal(p.isnan(), r.isnan())
            assert torch.equal(p.isposinf(), r.isposinf())
            assert torch.equal(p.isneginf(), r.isneginf())
            fin = r.isfinite()
            assert rel_err(p[fin], r[fin]) <= 1e-6
            seen_nan |= bool(r.isnan().any())
            seen_inf |= bool(r.isinf().any())
    assert seen_nan and seen_inf  # the test did exercise both
    if config["momentum"]:
        for p, r in zip(ours, ref):
            b, rb = opt.state[p]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"]
            assert torch.equal(b.isnan(), rb.isnan()) and torch.equal(b.isinf(), rb.isinf())


# ---- state, skipped params, closures, threads -------------------------------------------------------


def test_no_momentum_keeps_no_state(gen):
    init = [torch.randn(s, generator=gen) for s in [(10,), (300,)]]
    ours = [nn.Parameter(t.clone()) for t in init]
    ref = [nn.Parameter(t.clone()) for t in init]
    opt = torchsgd8.SGD(ours, lr=LR, momentum=0, weight_decay=0.01)
    ref_opt = torch.optim.SGD(ref, lr=LR, momentum=0, weight_decay=0.01, foreach=False)
    for _ in range(3):
        set_same_grads([ours, ref], gen)
        opt.step()
        ref_opt.step()
    assert all(not s for s in opt.state.values())
    # torch keeps no state entries at all for momentum == 0; neither should we
    assert ref_opt.state_dict()["state"] == {}
    assert opt.state_dict()["state"] == ref_opt.state_dict()["state"]
    for p, r in zip(ours, ref):
        assert rel_err(p, r) <= 1e-6


@pytest.mark.parametrize("config", [
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.9, nesterov=True, weight_decay=0.01),
], ids=["dampening", "nesterov"])
def test_param_without_grad_is_skipped_and_initialised_later(config, gen):
    init = [torch.randn(s, generator=gen) for s in [(300,), (7, 5), (300,)]]
    ours = [nn.Parameter(t.clone()) for t in init]
    ref = [nn.Parameter(t.clone()) for t in init]
    opt = torchsgd8.SGD(ours, lr=LR, **config)
    ref_opt = torch.optim.SGD(ref, lr=LR, foreach=False, **config)
    for step in range(6):
        for k, (p, r) in enumerate(zip(ours, ref)):
            skip = (step == 0 and k in (1, 2)) or (step == 4 and k == 0)
            if skip:
                p.grad = r.grad = None
            else:
                p.grad = torch.randn(p.shape, generator=gen)
                r.grad = p.grad.clone()
        before = [p.detach().clone() for p in ours]
        bufs_before = {k: opt.state[p]["momentum_buffer"].clone() for k, p in enumerate(ours)
                       if "momentum_buffer" in opt.state.get(p, {})}
        opt.step()
        ref_opt.step()
        for k, (p, r) in enumerate(zip(ours, ref)):
            assert rel_err(p, r) <= 1e-6, (step, k)
            if p.grad is None:
                assert torch.equal(p, before[k])
                if k in bufs_before:
                    assert torch.equal(opt.state[p]["momentum_buffer"], bufs_before[k])
                else:
                    assert "momentum_buffer" not in opt.state.get(p, {})
            else:
                assert rel_err(opt.state[p]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"]) <= 1e-6


def test_closure_returns_loss_and_runs_with_grad(gen):
    x = torch.randn(16, 5, generator=gen)
    y = torch.randn(16, 3, generator=gen)
    model = nn.Linear(5, 3)
    ref_model = nn.Linear(5, 3)
    ref_model.load_state_dict(model.state_dict())
    opt = torchsgd8.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, nesterov=True, foreach=False)
    grad_enabled = []

    def make_closure(m, o, record):
        def closure():
            record.append(torch.is_grad_enabled())
            o.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        return closure

    losses, ref_losses = [], []
    for _ in range(5):
        with torch.no_grad():  # step must enable grad for the closure itself
            losses.append(opt.step(make_closure(model, opt, grad_enabled)))
        ref_losses.append(ref_opt.step(make_closure(ref_model, ref_opt, [])))
    assert grad_enabled == [True] * 5
    assert all(isinstance(loss, torch.Tensor) and loss.grad_fn is not None for loss in losses)
    assert [loss.item() for loss in losses] == pytest.approx([loss.item() for loss in ref_losses], rel=1e-6)
    assert losses[-1].item() < losses[0].item()
    for p, r in zip(model.parameters(), ref_model.parameters()):
        assert rel_err(p, r) <= 1e-6
    assert opt.step() is None  # without a closure


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_thread_count_does_not_change_results(dtype, gen, restore_threads):
    # big enough that at::parallel_for splits the work across two threads
    shapes = [(150_001,), (3,), (300, 301), (0,), (257,)]
    init = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(4)]

    def train(threads):
        torch.set_num_threads(threads)
        params = [nn.Parameter(t.clone()) for t in init]
        opt = torchsgd8.SGD(params, lr=LR, momentum=0.9, dampening=0.1, weight_decay=0.01)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        return params, [opt.state[p]["momentum_buffer"] for p in params]

    p1, b1 = train(1)
    p2, b2 = train(2)
    assert torch.get_num_threads() == 2
    for a, b in zip(p1 + b1, p2 + b2):
        assert torch.equal(a, b)
    assert not torch.equal(p1[0], init[0])


if __name__ == "__main__" and sys.argv[1:] == ["--portable"]:
    _portable_main()
