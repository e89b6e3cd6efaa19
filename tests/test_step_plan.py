"""The per-group step plan (optim.py, SGD._planned_buckets): eager steps after the first reuse how the
group was split into op calls, checking every param, grad and state entry each step. Whatever is changed
between steps must give the same result as without the plan: the same as torch.optim.SGD for full-
precision state, and bit for bit the same as the full path (the plan turned off) for 8-bit state.
"""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from torch import nn

import torchsgd8

LR, MOMENTUM, STEPS, CHANGE_AT = 0.05, 0.9, 6, 3
# 8-bit state for the first two (with min_8bit_size=4096), full precision for the rest
SHAPES = [(40, 130), (5000,), (7,), (33, 65), ()]


def _param(shape, gen, dtype=torch.float32):
    return nn.Parameter(torch.randn(shape, generator=gen).to(dtype))


# Changes made between steps, identically to ours and to the reference: fn(opt, step), called after the
# grads of that step are set. Each makes a change at CHANGE_AT (some undo it later).
def _reset_state_dict(opt, step):
    if step == CHANGE_AT:
        p = opt.param_groups[0]["params"][0]
        opt.state[p] = {}


def _delete_state(opt, step):
    if step == CHANGE_AT:
        del opt.state[opt.param_groups[0]["params"][1]]


def _clear_all_state(opt, step):
    if step == CHANGE_AT:
        opt.state.clear()


def _new_state_mapping(opt, step):
    if step == CHANGE_AT:
        opt.state = defaultdict(dict)


def _replace_buffer(opt, step):
    if step == CHANGE_AT:
        for p in opt.param_groups[0]["params"][2:4]:
            opt.state[p]["momentum_buffer"] = torch.full_like(p, 0.5)


def _grad_none_once(opt, step):
    if step == CHANGE_AT:
        for p in opt.param_groups[0]["params"][1:3]:
            p.grad = None


def _append_param(opt, step):
    if step == CHANGE_AT:
        p = _param((300,), torch.Generator().manual_seed(7))
        p.grad = torch.randn(300, generator=torch.Generator().manual_seed(8))
        opt.param_groups[0]["params"].append(p)


def _remove_param(opt, step):
    if step == CHANGE_AT:
        opt.param_groups[0]["params"].pop(1)


def _swap_param(opt, step):
    if step == CHANGE_AT:
        group = opt.param_groups[0]
        old = group["params"][3]
        new = nn.Parameter(old.detach().clone())
        new.grad = old.grad
        group["params"][3] = new


def _momentum_off_then_on(opt, step):
    if step == CHANGE_AT:
        opt.param_groups[0]["momentum"] = 0.0
    elif step == CHANGE_AT + 1:
        opt.param_groups[0]["momentum"] = MOMENTUM


def _lr_change_and_back(opt, step):
    if step == CHANGE_AT:
        opt.param_groups[0]["lr"] = 0.02
    elif step == CHANGE_AT + 1:
        opt.param_groups[0]["lr"] = LR


def _noncontiguous_grad(opt, step):
    if step == CHANGE_AT:
        for p in opt.param_groups[0]["params"]:
            if p.dim() == 2:
                p.grad = p.grad.t().contiguous().t()


def _reload_state_dict(opt, step):
    if step == CHANGE_AT:
        opt.load_state_dict(opt.state_dict())


def _replace_param_data(opt, step):
    if step == CHANGE_AT:
        for p in opt.param_groups[0]["params"]:
            p.data = p.data.clone()


def _noncontiguous_param(opt, step):
    if step == CHANGE_AT:
        for p in opt.param_groups[0]["params"]:
            if p.dim() == 2:
                p.data = p.data.t().contiguous().t()  # same values, column-major


def _frozen_param(opt, step):  # never has a grad (a frozen layer left in the optimizer)
    opt.param_groups[0]["params"][2].grad = None


def _frozen_until_change(opt, step):
    if step < CHANGE_AT:
        for p in opt.param_groups[0]["params"][:2]:
            p.grad = None


CHANGES = [_reset_state_dict, _delete_state, _clear_all_state, _new_state_mapping, _replace_buffer, _grad_none_once,
           _append_param, _remove_param, _swap_param, _momentum_off_then_on, _lr_change_and_back,
           _noncontiguous_grad, _noncontiguous_param, _reload_state_dict, _replace_param_data,
           _frozen_param, _frozen_until_change]


def _train(make_opt, change, dtype=torch.float32):
    """STEPS steps on SHAPES params with seeded grads; `change` runs before each step."""
    gen = torch.Generator().manual_seed(0)
    opt = make_opt([_param(s, gen, dtype) for s in SHAPES])
    for step in range(STEPS):
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        change(opt, step)
        opt.step()
    return opt


def _without_plan(opt):
    opt._planned_buckets = lambda group: None  # every step takes the full path
    return opt


def _assert_identical(ours, ref, state_keys):
    ours_params, ref_params = ours.param_groups[0]["params"], ref.param_groups[0]["params"]
    assert len(ours_params) == len(ref_params)
    for i, (p, r) in enumerate(zip(ours_params, ref_params)):
        assert torch.equal(p, r), f"param {i}"
        s, t = ours.state.get(p, {}), ref.state.get(r, {})
        assert sorted(k for k in s if k in state_keys) == sorted(k for k in t if k in state_keys), f"state keys of param {i}"
        for key in state_keys:
            if key in s:
                assert torch.equal(s[key], t[key]), f"{key} of param {i}"


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_full_precision_matches_torch_whatever_changes_between_steps(change):
    ours = _train(lambda ps: torchsgd8.SGD32bit(ps, lr=LR, momentum=MOMENTUM), change)
    ref = _train(lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM, foreach=False), change)
    if torchsgd8._C.cpu_isa() in ("AVX2", "AVX512"):  # the same bits as torch (test_semantics)
        _assert_identical(ours, ref, ["momentum_buffer"])
    else:
        for p, r in zip(ours.param_groups[0]["params"], ref.param_groups[0]["params"]):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def _replace_codes(opt, step):
    if step == CHANGE_AT:
        state = opt.state[opt.param_groups[0]["params"][0]]
        state["state1"] = torch.full_like(state["state1"], 200)
        state["absmax1"] = torch.full_like(state["absmax1"], 0.25)


@pytest.mark.parametrize("change", CHANGES + [_replace_codes], ids=lambda f: f.__name__.strip("_"))
def test_8bit_state_is_the_same_with_and_without_the_plan(change):
    def make(ps):
        return torchsgd8.SGD8bit(ps, lr=LR, momentum=MOMENTUM)

    ours = _train(make, change)
    ref = _train(lambda ps: _without_plan(make(ps)), change)
    _assert_identical(ours, ref, ["momentum_buffer", "state1", "absmax1", "step"])


def test_stochastic_rounding_is_the_same_with_and_without_the_plan():
    def make(ps):
        torch.manual_seed(0)  # the group's rounding_seed is drawn from torch's default generator
        return torchsgd8.SGD8bit(ps, lr=LR, momentum=MOMENTUM, stochastic_rounding=True)

    ours = _train(make, lambda opt, step: None, dtype=torch.bfloat16)
    ref = _train(lambda ps: _without_plan(make(ps)), lambda opt, step: None, dtype=torch.bfloat16)
    _assert_identical(ours, ref, ["momentum_buffer", "state1", "absmax1", "step"])


def _count_full_passes(opt) -> list:
    """A list that gets an entry for each full pass (a step without the plan) of `opt`."""
    full_passes = []
    collect = opt._collect_buckets
    opt._collect_buckets = lambda *args, **kwargs: full_passes.append(1) or collect(*args, **kwargs)
    return full_passes


def test_steps_after_the_first_use_the_plan():
    gen = torch.Generator().manual_seed(0)
    params = [_param(s, gen) for s in SHAPES]
    opt = torchsgd8.SGD8bit(params, lr=LR, momentum=MOMENTUM)
    full_passes = _count_full_passes(opt)

    def step():
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()

    for _ in range(3):
        step()
    assert len(full_passes) == 1  # the first step creates the state and the plan; the next two are planned
    opt.state[params[0]] = {}
    step()
    step()
    assert len(full_passes) == 2  # one full pass to recreate the state, then planned again


def test_params_without_grads_are_planned_too():
    """A param that never gets a grad (frozen) does not stop the plan; one that gets a grad does."""
    gen = torch.Generator().manual_seed(0)
    params = [_param(s, gen) for s in SHAPES]
    frozen = params[1]
    before = frozen.detach().clone()
    opt = torchsgd8.SGD8bit(params, lr=LR, momentum=MOMENTUM)
    full_passes = _count_full_passes(opt)

    def step():
        for p in params:
            p.grad = None if p is frozen else torch.randn(p.shape, generator=gen)
        opt.step()

    for _ in range(4):
        step()
    assert len(full_passes) == 1 and frozen not in opt.state and torch.equal(frozen, before)
    frozen = None  # from now on every param has a grad: the plan no longer applies, a new one is made
    step()
    step()
    assert len(full_passes) == 2 and params[1] in opt.state


def test_no_plan_is_made_for_grads_it_would_refuse():
    """Non-contiguous grads are copied by the full pass; a plan made from that step would refuse the same
    grads on the next one, so none is made until the grads fit."""
    gen = torch.Generator().manual_seed(0)
    params = [_param(s, gen) for s in SHAPES]
    opt = torchsgd8.SGD8bit(params, lr=LR, momentum=MOMENTUM)
    full_passes = _count_full_passes(opt)

    def step(contiguous):
        for p in params:
            grad = torch.randn(p.shape[::-1], generator=gen).t() if p.dim() == 2 else torch.randn(p.shape, generator=gen)
            p.grad = grad.contiguous() if contiguous else grad
        opt.step()

    for _ in range(3):
        step(contiguous=False)
    assert len(full_passes) == 3 and opt._plans == {}
    for _ in range(3):
        step(contiguous=True)
    assert len(full_passes) == 4 and len(opt._plans) == 1


def test_bad_grad_after_planned_steps_changes_nothing():
    gen = torch.Generator().manual_seed(0)
    first, second = [_param(s, gen) for s in SHAPES], [_param((300,), gen)]
    opt = torchsgd8.SGD8bit([{"params": first}, {"params": second}], lr=LR, momentum=MOMENTUM)
    for _ in range(2):
        for p in first + second:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    before = [t.clone() for p in first + second for t in [p, *opt.state[p].values()]]
    second[0].grad.data = torch.randn(301, generator=gen)  # what `p.grad = ...` refuses
    with pytest.raises(RuntimeError, match="param 0 in group 1 .* must match its param"):
        opt.step()
    second[0].grad.data = torch.randn(300, generator=gen, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="param 0 in group 1 .* must match its param"):
        opt.step()
    second[0].grad = None
    second[0].grad = torch.randn(300, generator=gen).to_sparse()
    with pytest.raises(RuntimeError, match="param 0 in group 1 is sparse"):
        opt.step()
    after = [t for p in first + second for t in [p, *opt.state[p].values()]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_a_group_on_two_devices_is_not_planned_and_still_updated():
    """Params of one group on two devices go to one op call per device on every step (no plan)."""
    gen = torch.Generator().manual_seed(0)
    cpu = _param((5000,), gen)
    ref = nn.Parameter(cpu.detach().clone())
    meta = nn.Parameter(torch.empty(300, device="meta"))  # the ops' fake kernels run on meta tensors
    opt = torchsgd8.SGD32bit([cpu, meta], lr=LR, momentum=MOMENTUM)
    ref_opt = torch.optim.SGD([ref], lr=LR, momentum=MOMENTUM, foreach=False)
    for _ in range(3):
        cpu.grad = torch.randn(5000, generator=gen)
        ref.grad = cpu.grad.clone()
        meta.grad = torch.empty(300, device="meta")
        opt.step()
        ref_opt.step()
    assert opt._plans == {}
    assert opt.state[meta]["momentum_buffer"].device.type == "meta"
    torch.testing.assert_close(cpu, ref, rtol=0, atol=0)
