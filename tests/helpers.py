"""Helpers several test files share: same grads for optimizers run side by side, a compiled training step,
a bytewise comparison of nested values (state dicts), and a bytewise snapshot of an optimizer for checking
that a failed call changed nothing."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor


def small_model() -> torch.nn.Module:
    """Linear(16, 300), ReLU, Linear(300, 4), seeded: its 16x300 weight gets 8-bit state with min_8bit_size
    1000, the rest fp32 momentum."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 300), torch.nn.ReLU(), torch.nn.Linear(300, 4))


def set_same_grads(param_lists: Sequence[Sequence[Tensor]], gen: torch.Generator) -> None:
    """Gives the i-th param of every list the same fresh random grad (float32 normal draws, cast to the
    params' dtype); the lists hold params of equal shapes and dtypes, e.g. ours and a reference's."""
    for params in zip(*param_lists):
        grad = torch.randn(params[0].shape, generator=gen).to(params[0].dtype)
        for p in params:
            p.grad = grad.clone()


def training_step(model: torch.nn.Module, opt: torch.optim.Optimizer,
                  loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """step(x, y): forward, grads, opt.step(); returns the loss, detached. Grads come from
    torch.autograd.grad, which dynamo traces (with trace_autograd_ops) where backward() breaks the graph,
    so a compiled step is one graph."""
    params = list(model.parameters())

    def step(x: Tensor, y: Tensor) -> Tensor:
        loss = loss_fn(model(x), y)
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p.grad = g
        opt.step()
        return loss.detach()

    return step


def raw_bytes(t: Tensor) -> bytes:
    """The bytes of a tensor's values (complex as its real view); none for a meta tensor, which has no data."""
    t = t.detach()
    if t.device.type == "meta":
        return b""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_identical(a: Any, b: Any, where: str = "state_dict") -> None:
    """a and b are the same nested value: dicts with the same keys in the same order, tensors of the same
    dtype, shape, device and bytes, and every other value of the same type and equal."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), where
        assert raw_bytes(a) == raw_bytes(b), f"{where}: values differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def optimizer_snapshot(opt: torch.optim.Optimizer, params: Optional[Sequence[Tensor]] = None) -> dict:
    """Params (default: the optimizer's), per-param state and param groups, as plain values: tensors as
    (dtype, shape, device, bytes), lists of params as their indices in `params`, anything else as its repr.
    Two snapshots are equal exactly when nothing changed."""
    if params is None:
        params = [p for group in opt.param_groups for p in group["params"]]
    index = {p: i for i, p in enumerate(params)}

    def value(v):
        if isinstance(v, Tensor):
            return ("tensor", v.dtype, tuple(v.shape), str(v.device), raw_bytes(v))
        if isinstance(v, list) and v and all(isinstance(p, Tensor) for p in v):
            return ("params", [index.get(p, id(p)) for p in v])
        return ("value", repr(v))

    return {
        "params": [value(p) for p in params],
        "state": {index.get(p, id(p)): {k: value(v) for k, v in s.items()} for p, s in opt.state.items()},
        "groups": [{k: value(v) for k, v in g.items()} for g in opt.param_groups],
    }


def assert_snapshot_unchanged(before: dict, after: dict) -> None:
    """Two optimizer_snapshot()s, taken before and after a call that failed, are the same."""
    assert before["params"] == after["params"], "the failed call changed the params"
    assert before["state"] == after["state"], (
        f"the failed call changed the optimizer state: params with state before {sorted(before['state'])}, "
        f"after {sorted(after['state'])}; changed: "
        f"{[i for i in after['state'] if before['state'].get(i) != after['state'][i]]}")
    assert before["groups"] == after["groups"], (
        f"the failed call changed the param groups: {len(before['groups'])} groups before, "
        f"{len(after['groups'])} after")
