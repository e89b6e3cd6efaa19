"""How a param group's params are split into op calls (buckets), and the plan that lets eager steps reuse
the split.

A bucket is the params of one group that one fused op call updates: same device, dtype, state kind and
first step. The full pass (collect_buckets) sorts the params with grads into buckets, creating missing
state; it runs on a group's first step, whenever the group's plan does not apply, and while compiling
(traced param by param). Eager steps otherwise rebuild the buckets from the group's plan (planned_buckets),
re-checking every param, because the Python work per param is most of a step's cost for small tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import ops
from ._layout import EIGHT_BIT, FULL, NONE, StateKind, init_state, local, uses_momentum


@dataclass
class Bucket:
    """The arguments of one op call. State lists by kind: FULL fills `buffers`; EIGHT_BIT `codes`, `absmax`
    and `steps`; NONE none. Slots: the step reads a bucket's lists once per param."""
    __slots__ = ("device", "dtype", "kind", "first_step", "params", "grads", "buffers", "codes", "absmax", "steps")
    device: torch.device
    dtype: torch.dtype
    kind: StateKind
    first_step: bool
    params: list[Tensor]
    grads: list[Tensor]
    buffers: list[Tensor]
    codes: list[Tensor]
    absmax: list[Tensor]
    steps: list[Tensor]


def new_bucket(device: torch.device, dtype: torch.dtype, kind: StateKind, first_step: bool) -> Bucket:
    return Bucket(device, dtype, kind, first_step, [], [], [], [], [], [])


def add_to_bucket(bucket: Bucket, work: Tensor, grad: Tensor, state: Optional[dict]) -> None:
    """One param's tensors for its op call: the (local) param and grad, and its state as it is in `state`
    (DTensors too: the full pass takes their local shards afterwards, for all params at once)."""
    bucket.params.append(work)
    bucket.grads.append(grad)
    kind = bucket.kind
    if kind is FULL:
        bucket.buffers.append(state["momentum_buffer"])
    elif kind is EIGHT_BIT:
        bucket.codes.append(state["state1"])
        bucket.absmax.append(state["absmax1"])
        bucket.steps.append(state["step"])


class GroupPlan(NamedTuple):
    """How a param group's last full pass split it into op calls: the params that had grads (`updated`)
    and their device, and per param its dtype and state kind (both None: it had no grad) and bucket
    (-1 without grad); holds no state tensors, which are read afresh every step. Groups whose params span
    devices, or none of whose params have a grad, get no plan."""
    group: dict
    uses_momentum: bool
    params: tuple[Tensor, ...]
    updated: tuple[Tensor, ...]
    device: torch.device
    dtypes: tuple[Optional[torch.dtype], ...]
    kinds: tuple[Optional[StateKind], ...]
    slots: tuple[int, ...]
    keys: tuple[tuple, ...]  # (device, dtype, kind, first_step=False) per bucket


def collect_buckets(group: dict, state: dict, codebook: Callable[[torch.device], Tensor], staged: list,
                    created: list, make_plan: bool) -> tuple[list[Bucket], Optional[GroupPlan]]:
    """Sorts the group's params with grads into buckets. Creates missing state in `state` (8-bit state
    sharing `codebook(device)`; the params listed in `created`) and contiguous copies of non-contiguous
    params (`staged`: (param, copy) pairs). With `make_plan`, returns the plan of the later steps where
    one applies."""
    momentum = uses_momentum(group["momentum"])
    buckets: dict[tuple, Bucket] = {}
    param_keys: list[Optional[tuple]] = []  # per param: its bucket's key, None without a grad
    plannable = make_plan
    # traced param by param under torch.compile: .contiguous() only where it makes a copy
    for p in group["params"]:
        grad = p.grad
        if grad is None:
            param_keys.append(None)
            continue
        kind, first_step, param_state = NONE, False, None
        if momentum:  # without momentum there is no state at all, as in torch
            param_state = state[p]
            first_step = not param_state
            if first_step:
                init_state(p, group, param_state, codebook)
                created.append(p)
            kind = EIGHT_BIT if "state1" in param_state else FULL
        # complex params go to the op as they are: it updates (real, imag) pairs, like torch; sharded
        # (FSDP2) params are updated shard by shard, each rank its own, with no communication
        work, grad = local(p), local(grad)
        if plannable and (work is not p or type(grad) is not Tensor):
            plannable = False  # sharded params and tensor-subclass grads take this path every step
        if not work.is_contiguous():
            work = work.contiguous()
            staged.append((p, work))
        if not grad.is_contiguous():
            grad = grad.contiguous()
            plannable = False  # the plan takes grads as they are: it would only fail the next step
        key = (p.device, work.dtype, kind, first_step)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = new_bucket(*key)
        param_keys.append(key)
        add_to_bucket(bucket, work, grad, param_state)
    for bucket in buckets.values():  # this rank's shards of DTensor state
        for tensors in (bucket.buffers, bucket.codes, bucket.absmax):
            tensors[:] = [local(t) for t in tensors]
    devices = {key[0] for key in param_keys if key is not None}
    plan = None
    if plannable and not staged and len(devices) == 1:
        # for the next steps, which are no param's first: (device, dtype, kind, False) buckets
        later_keys: dict[tuple, int] = {}
        slots = tuple(-1 if key is None else later_keys.setdefault(key[:3] + (False,), len(later_keys))
                      for key in param_keys)
        params = tuple(group["params"])
        plan = GroupPlan(group, momentum, params, tuple(p for p, key in zip(params, param_keys) if key is not None),
                         devices.pop(), tuple(None if key is None else key[1] for key in param_keys),
                         tuple(None if key is None else key[2] for key in param_keys), slots, tuple(later_keys))
    return list(buckets.values()), plan


def planned_buckets(plan: GroupPlan, group: dict, state: dict) -> Optional[list[Bucket]]:
    """The buckets of collect_buckets from the group's plan, or None where the plan does not apply.

    Every param is checked each step against what the plan assumed (the same param; still without a grad
    if it had none, else of the same dtype, on the planned device and contiguous, with a plain contiguous
    grad of its shape, dtype and device, and state of the planned kind), and the state is read afresh:
    edits of the group, of ``opt.state`` or of a param's state dict between steps, and bad grads (which
    the full pass's grad check then reports), fall back to the full pass. Shapes, devices and contiguity
    are checked by one C++ call for all params (ops.grads_fit): asked per param in Python, they were a
    third of a step's Python work.
    """
    params = group["params"]
    if (plan.group is not group or plan.uses_momentum != uses_momentum(group["momentum"])
            or len(params) != len(plan.params)):
        return None
    buckets = [new_bucket(*key) for key in plan.keys]
    grads = []
    for p, planned, dtype, kind, slot in zip(params, plan.params, plan.dtypes, plan.kinds, plan.slots):
        if p is not planned:
            return None
        grad = p.grad
        if kind is None:  # a param without grad (frozen, say) must still have none
            if grad is not None:
                return None
            continue
        if grad is None or type(grad) is not Tensor or p.dtype is not dtype:
            return None
        param_state = None
        if kind is not NONE:
            param_state = state.get(p)
            if not param_state or ("state1" in param_state) != (kind is EIGHT_BIT):
                return None  # no state (a first step) or state of the other kind
        grads.append(grad)
        add_to_bucket(buckets[slot], p, grad, param_state)  # plans hold no DTensors
    # the params with grads are the plan's (each was checked to be its planned param); all on the device
    # of the first, which must be the plan's
    updated = plan.updated
    if updated[0].device != plan.device or not ops.grads_fit(updated, grads):
        return None
    return buckets
