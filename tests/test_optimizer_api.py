"""The optimizer API: validation, lr forms, LR schedulers, state-dict interop, op-call bucketing, CLI."""
from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

import torchsgd8

from helpers import set_same_grads

CLASSES = [torchsgd8.SGD, torchsgd8.SGD32bit, torchsgd8.SGD8bit]


def _params(gen, shapes=((5, 3), (3,), (300,)), dtype=torch.float32):
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _clone(params):
    return [nn.Parameter(p.detach().clone()) for p in params]


def _assert_same(ours, ref, rtol=1e-6):
    for p, r in zip(ours, ref):
        err = (p.detach().double() - r.detach().double()).abs().max().item()
        assert err <= rtol * max(r.detach().double().abs().max().item(), 1e-30)


# ---- constructor validation ---------------------------------------------------------------------------

TORCH_SHARED_INVALID = [
    dict(lr=-0.1),
    dict(lr=0.1, momentum=-0.5),
    dict(lr=0.1, weight_decay=-1e-4),
    dict(lr=0.1, nesterov=True),
    dict(lr=0.1, momentum=0.0, nesterov=True),
    dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
    dict(lr=torch.tensor([0.1, 0.2])),
]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs", TORCH_SHARED_INVALID, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()))
def test_invalid_hyperparameters_raise_like_torch(cls, kwargs):
    with pytest.raises(ValueError):
        torch.optim.SGD([nn.Parameter(torch.zeros(3))], **kwargs)
    with pytest.raises(ValueError):
        cls([nn.Parameter(torch.zeros(3))], **kwargs)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("lr", [float("nan"), torch.tensor(float("nan"))], ids=["float", "tensor"])
def test_nan_lr_raises(cls, lr):
    with pytest.raises(ValueError, match="learning rate"):
        cls([nn.Parameter(torch.zeros(3))], lr=lr)


@pytest.mark.parametrize("bits", [0, 4, 16, 64, "8"])
def test_optim_bits_must_be_8_or_32(bits):
    with pytest.raises(ValueError, match="optim_bits"):
        torchsgd8.SGD([nn.Parameter(torch.zeros(3))], lr=0.1, optim_bits=bits)
    opt = torchsgd8.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="optim_bits"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "optim_bits": bits})


def test_add_param_group_validates():
    opt = torchsgd8.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "lr": -1.0})
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "momentum": 0.0, "nesterov": True})


def test_valid_construction_and_aliases():
    assert torchsgd8.optim.SGD is torchsgd8.SGD
    assert issubclass(torchsgd8.SGD8bit, torchsgd8.SGD) and issubclass(torchsgd8.SGD32bit, torchsgd8.SGD)
    assert torchsgd8.SGD8bit([nn.Parameter(torch.zeros(3))], lr=0.1).defaults["optim_bits"] == 8
    assert torchsgd8.SGD32bit([nn.Parameter(torch.zeros(3))], lr=0.1).defaults["optim_bits"] == 32
    assert torchsgd8.SGD([nn.Parameter(torch.zeros(3))], lr=0.0, optim_bits=8).defaults["optim_bits"] == 8


# ---- lr as float or tensor ------------------------------------------------------------------------------


@pytest.mark.parametrize("lr_kind", ["float", "0-dim", "1-elem"])
def test_lr_float_or_one_element_tensor(lr_kind, gen):
    make = {"float": lambda v: v, "0-dim": lambda v: torch.tensor(v), "1-elem": lambda v: torch.tensor([v])}[lr_kind]
    init = _params(gen)
    ours, ref = _clone(init), _clone(init)
    lr = make(0.05)
    opt = torchsgd8.SGD(ours, lr=lr, momentum=0.9)
    ref_opt = torch.optim.SGD(ref, lr=0.05, momentum=0.9, foreach=False)
    for step in range(6):
        if step == 3:  # change the lr between steps, the way a user or scheduler would
            if isinstance(lr, torch.Tensor):
                lr.fill_(0.01)
            else:
                opt.param_groups[0]["lr"] = 0.01
            ref_opt.param_groups[0]["lr"] = 0.01
        set_same_grads([ours, ref], gen)
        opt.step()
        ref_opt.step()
        _assert_same(ours, ref)
    assert not torch.equal(ours[0], init[0])


# ---- LR schedulers ----------------------------------------------------------------------------------------

SCHEDULERS = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=4, gamma=0.5),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=25, cycle_momentum=True,
                                                    base_momentum=0.8, max_momentum=0.95),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=0.001),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda epoch: 1.0 / (1 + epoch)),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=2),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=4,
                                                cycle_momentum=True, base_momentum=0.8, max_momentum=0.9),
}
CHANGES_MOMENTUM = {"OneCycleLR", "CyclicLR"}


# every scheduler with a float lr; the closed-form ones also with a tensor lr (updated in place)
SCHEDULER_CASES = [(name, False) for name in SCHEDULERS] + [
    (name, True) for name in ("StepLR", "CosineAnnealingLR", "LambdaLR")]


@pytest.mark.parametrize("name,tensor_lr", SCHEDULER_CASES,
                         ids=[f"{n}-{'tensor' if t else 'float'}-lr" for n, t in SCHEDULER_CASES])
def test_lr_schedulers_drive_us_like_torch(name, tensor_lr, gen):
    x = torch.randn(32, 5, generator=gen)
    y = torch.randn(32, 3, generator=gen)
    init = _params(gen, shapes=((5, 3), (3,)))
    runs = {}
    for which in ("ours", "torch"):
        params = _clone(init)
        lr = torch.tensor(0.05) if tensor_lr else 0.05
        kwargs = dict(lr=lr, momentum=0.9, weight_decay=1e-3)
        opt = torchsgd8.SGD(params, **kwargs) if which == "ours" else torch.optim.SGD(params, foreach=False, **kwargs)
        sched = SCHEDULERS[name](opt)
        lrs, moms = [], []
        for _ in range(20):
            opt.zero_grad()
            loss = ((x @ params[0] + params[1] - y) ** 2).mean()
            loss.backward()
            opt.step()
            if name == "ReduceLROnPlateau":
                sched.step(1.0)  # a metric that never improves: the lr must drop
            else:
                sched.step()
            lrs.append(float(opt.param_groups[0]["lr"]))
            moms.append(float(opt.param_groups[0]["momentum"]))
        runs[which] = (params, lrs, moms)
    (ours, lrs, moms), (ref, ref_lrs, ref_moms) = runs["ours"], runs["torch"]
    assert lrs == ref_lrs and moms == ref_moms
    assert len(set(lrs)) > 1
    if name in CHANGES_MOMENTUM:
        assert len(set(moms)) > 1
    _assert_same(ours, ref)
    assert not torch.equal(ours[0], init[0])


# ---- state dicts ------------------------------------------------------------------------------------------


def test_torch_state_dict_loads_into_sgd32bit(gen):
    init = _params(gen)
    ref = _clone(init)
    ref_opt = torch.optim.SGD(ref, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=False)
    for step in range(4):
        set_same_grads([ref], gen)
        if step == 0:
            ref[2].grad = None  # param 2 joins late: its buffer is younger than the others
        ref_opt.step()
    ours = _clone(ref)
    opt = torchsgd8.SGD32bit(ours, lr=1.0, momentum=0.1)  # loading must bring torch's hyperparameters
    opt.load_state_dict(ref_opt.state_dict())  # live (not copied) dict: we must not alias its buffers
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.05, 0.9, True, 0.01)
    for p, r in zip(ours, ref):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[r]["momentum_buffer"])
    for _ in range(5):
        set_same_grads([ours, ref], gen)
        opt.step()
        ref_opt.step()
    for p, r in zip(ours, ref):
        _assert_same([p], [r])
        _assert_same([opt.state[p]["momentum_buffer"]], [ref_opt.state[r]["momentum_buffer"]])


def test_our_state_dict_loads_into_torch(gen):
    init = _params(gen)
    ours = _clone(init)
    opt = torchsgd8.SGD32bit(ours, lr=0.05, momentum=0.9, dampening=0.2)
    for step in range(4):
        set_same_grads([ours], gen)
        if step == 0:
            ours[1].grad = None
        opt.step()
    ref = _clone(ours)
    ref_opt = torch.optim.SGD(ref, lr=1.0, foreach=False)
    # torch's load_state_dict keeps the saved tensors when no cast is needed, so hand it a copy
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert ref_opt.param_groups[0]["momentum"] == 0.9 and ref_opt.param_groups[0]["dampening"] == 0.2
    for _ in range(5):
        set_same_grads([ours, ref], gen)
        opt.step()
        ref_opt.step()
    _assert_same(ours, ref)
    for p, r in zip(ours, ref):
        _assert_same([opt.state[p]["momentum_buffer"]], [ref_opt.state[r]["momentum_buffer"]])


@pytest.mark.parametrize("bits", [32, 8])
def test_state_dict_roundtrip_through_torch_save_weights_only(bits, gen):
    init = _params(gen, shapes=((5, 3), (600,), (300,)))
    ours = _clone(init)
    opt = torchsgd8.SGD(ours, lr=0.05, momentum=0.9, optim_bits=bits, min_8bit_size=256)
    for _ in range(3):
        set_same_grads([ours], gen)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded[next(k for k in loaded if k.startswith("torchsgd8"))] == opt.state_dict()["torchsgd8_format_version"]

    copy_params = _clone(ours)
    opt2 = torchsgd8.SGD(copy_params, lr=0.5, momentum=0.1, optim_bits=bits, min_8bit_size=256)
    opt2.load_state_dict(loaded)
    for p, q in zip(ours, copy_params):
        s, s2 = opt.state[p], opt2.state[q]
        assert s.keys() == s2.keys()
        for k in s:
            assert torch.equal(s[k], s2[k]), k
    if bits == 8:
        assert "state1" in opt.state[ours[1]] and "momentum_buffer" in opt.state[ours[0]]
    for _ in range(3):
        set_same_grads([ours, copy_params], gen)
        opt.step()
        opt2.step()
    for p, q in zip(ours, copy_params):
        assert torch.equal(p, q)
        for k in opt.state[p]:
            assert torch.equal(opt.state[p][k], opt2.state[q][k])


# ---- one op call per bucket ---------------------------------------------------------------------------------


class OpRecorder(TorchDispatchMode):
    """Records every torchsgd8 op that reaches the dispatcher, with its arguments bound by name."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "torchsgd8":
            bound = dict(zip([a.name for a in func._schema.arguments], args), **kwargs)
            self.calls.append((func.__name__.split(".")[0], bound))
        return func(*args, **kwargs)


def _record_step(opt):
    with OpRecorder() as rec:
        opt.step()
    return rec.calls


def test_one_call_per_group_for_many_params(gen):
    params = _params(gen, shapes=[(i + 1,) for i in range(20)] + [(33, 65)])
    params.append(nn.Parameter(torch.randn(65, 33, generator=gen).t()))  # non-contiguous
    opt = torchsgd8.SGD(params, lr=0.1, momentum=0.9)
    for step in range(2):
        set_same_grads([params], gen)
        calls = _record_step(opt)
        assert len(calls) == 1
        name, args = calls[0]
        assert name == "sgd_update_"
        assert len(args["params"]) == len(args["grads"]) == len(args["momentum_buffers"]) == 22
        assert args["first_step"] is (step == 0)


def test_no_momentum_call_has_no_buffers(gen):
    params = _params(gen)
    opt = torchsgd8.SGD(params, lr=0.1)
    set_same_grads([params], gen)
    calls = _record_step(opt)
    assert len(calls) == 1 and calls[0][0] == "sgd_update_"
    assert len(calls[0][1]["params"]) == 3 and len(calls[0][1]["momentum_buffers"]) == 0


def test_mixed_dtypes_in_one_group_make_two_calls(gen):
    params = _params(gen) + _params(gen, dtype=torch.float64)
    ref = _clone(params)
    opt = torchsgd8.SGD(params, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=False)
    for _ in range(2):
        set_same_grads([params, ref], gen)
        calls = _record_step(opt)
        ref_opt.step()
        assert len(calls) == 2
        assert sorted(str(c[1]["params"][0].dtype) for c in calls) == ["torch.float32", "torch.float64"]
        assert all(len(c[1]["params"]) == 3 for c in calls)
    _assert_same(params, ref)


def test_one_call_per_group(gen):
    a, b = _params(gen), _params(gen)
    opt = torchsgd8.SGD([{"params": a}, {"params": b, "lr": 0.01, "nesterov": True}], lr=0.1, momentum=0.9)
    set_same_grads([a + b], gen)
    calls = _record_step(opt)
    assert len(calls) == 2
    assert [float(c[1]["lr"]) for c in calls] == [0.1, 0.01]
    assert [c[1]["nesterov"] for c in calls] == [False, True]


def test_late_first_step_is_its_own_bucket(gen):
    params = _params(gen)
    opt = torchsgd8.SGD(params, lr=0.1, momentum=0.9)
    set_same_grads([params], gen)
    params[1].grad = None
    calls = _record_step(opt)
    assert len(calls) == 1 and len(calls[0][1]["params"]) == 2 and calls[0][1]["first_step"] is True
    set_same_grads([params], gen)
    calls = _record_step(opt)
    assert sorted((len(c[1]["params"]), c[1]["first_step"]) for c in calls) == [(1, True), (2, False)]


def test_8bit_and_full_precision_state_kinds_are_separate_buckets(gen):
    params = (_params(gen, shapes=((600,), (300,), (10,))) + _params(gen, shapes=((300,),), dtype=torch.float64))
    opt = torchsgd8.SGD8bit(params, lr=0.1, momentum=0.9, min_8bit_size=256)
    for step in range(2):
        set_same_grads([params], gen)
        calls = _record_step(opt)
        summary = sorted((name, str(args["params"][0].dtype), len(args["params"]), args["first_step"])
                         for name, args in calls)
        assert summary == [("sgd8bit_update_", "torch.float32", 2, step == 0),
                           ("sgd_update_", "torch.float32", 1, step == 0),
                           ("sgd_update_", "torch.float64", 1, step == 0)]
        # the 8-bit state's step counters are counted by the bucket's own call
        counted = [args["steps"] for name, args in calls if name == "sgd8bit_update_"]
        assert [[s.item() for s in c] for c in counted] == [[step + 1.0] * 2]
        assert [s is opt.state[p]["step"] for s, p in zip(counted[0], params[:2])] == [True, True]


# ---- python -m torchsgd8 ------------------------------------------------------------------------------------


def test_module_main_prints_versions_ops_and_isa():
    proc = subprocess.run([sys.executable, "-m", "torchsgd8"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert torchsgd8.__version__ in out
    assert torch.__version__ in out
    for op in ("sgd_update_", "sgd8bit_update_", "grads_fit", "quantize_blockwise", "dequantize_blockwise"):
        assert f"torchsgd8::{op}" in out
    assert torchsgd8._C.cpu_isa() in out
    assert f"prefetch {'on' if torchsgd8._C.cpu_prefetch() else 'off'}" in out
    assert f"AVX2 gathers {'on' if torchsgd8._C.cpu_gather() else 'off'}" in out


# ---- without numpy (torch does not need it, and torchsgd8 does not declare it) -------------------------


def _steps_and_conversions() -> dict:
    """Three SGD8bit steps (8-bit state in both block layouts and full precision), then the state dict
    converted to full precision and back to 8 bits by load_state_dict."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in ((20, 300), (5000,), (7,))]
    opt = torchsgd8.SGD8bit(params, lr=0.1, momentum=0.9, min_8bit_size=1000)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    full = torchsgd8.SGD32bit(params, lr=0.1, momentum=0.9)
    full.load_state_dict(opt.state_dict())
    opt.load_state_dict(full.state_dict())
    return {"params": params, "8bit": opt.state_dict(), "full": full.state_dict()}


def test_import_and_steps_work_without_numpy(tmp_path):
    code = ("import sys; sys.modules['numpy'] = None; "  # `import numpy` raises ImportError, as if not installed
            "sys.path.insert(0, sys.argv[1]); import torch, test_optimizer_api as t; "
            "torch.save(t._steps_and_conversions(), sys.argv[2]); "
            "assert sys.modules['numpy'] is None")
    out = tmp_path / "result.pt"
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    without, with_numpy = torch.load(out), _steps_and_conversions()
    torch.testing.assert_close(without, with_numpy, rtol=0, atol=0)


# ---- step hooks and the profiler range (our step wrapper stands in for Optimizer's) -------------------


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_step_hooks_run_once_per_step_in_torch_order(cls, gen):
    params = _params(gen)
    opt = cls(params, lr=0.1, momentum=0.9)
    order = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: order.append(("global pre", o))),
        opt.register_step_pre_hook(lambda o, a, k: order.append(("pre", o))),
        opt.register_step_post_hook(lambda o, a, k: order.append(("post", o))),
        register_optimizer_step_post_hook(lambda o, a, k: order.append(("global post", o))),
    ]
    try:
        set_same_grads([params], gen)
        opt.step()
    finally:
        for h in handles:
            h.remove()
    assert order == [("global pre", opt), ("pre", opt), ("post", opt), ("global post", opt)]
    order.clear()
    opt.step()
    assert order == []  # removed


def test_step_pre_hook_can_replace_the_arguments(gen):
    params = _params(gen)
    opt = torchsgd8.SGD8bit(params, lr=0.1, momentum=0.9)
    set_same_grads([params], gen)
    calls = []
    # as with torch's optimizers, the hook's args start with the optimizer itself
    opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": lambda: calls.append(args[0] is o) or 3.0}))
    assert opt.step() == 3.0 and calls == [True]
    opt.register_step_pre_hook(lambda o, args, kwargs: "not a pair")
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        opt.step()


def test_subclass_overriding_step_runs_hooks_once(gen):
    class Logged(torchsgd8.SGD8bit):
        def step(self, closure=None):
            return super().step(closure)

    params = _params(gen)
    opt = Logged(params, lr=0.1, momentum=0.9)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    set_same_grads([params], gen)
    opt.step()
    assert seen == ["pre", "post"]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_profiler_shows_the_step_range(cls, gen):
    params = _params(gen)
    opt = cls(params, lr=0.1, momentum=0.9)
    set_same_grads([params], gen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [e.name for e in prof.events()]
    assert f"Optimizer.step#{cls.__name__}.step" in names
    assert any(name.startswith("torchsgd8::") for name in names)


def test_step_leaves_grad_mode_as_it_was(gen):
    params = _params(gen)
    opt = torchsgd8.SGD8bit(params, lr=0.1, momentum=0.9)
    set_same_grads([params], gen)
    opt.step()  # runs without grad (the ops reject tensors requiring grad when grad mode is on)
    assert torch.is_grad_enabled()
    with torch.no_grad():
        opt.step()
        assert not torch.is_grad_enabled()
    params[0].grad.data = torch.zeros(2)  # a grad that does not fit: step raises
    with pytest.raises(RuntimeError, match="must match its param"):
        opt.step()
    assert torch.is_grad_enabled()
    assert all(p.grad_fn is None and p.requires_grad for p in params)
