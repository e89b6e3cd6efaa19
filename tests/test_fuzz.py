"""Property-based (hypothesis) tests of torchsgd8.SGD against a float64 reference, and of load_state_dict
against mutated state dicts.

Trajectories: random param groups (1-3) of random params (0-dim, empty, block boundaries 255/256/257,
sizes around min_8bit_size, 2-D and non-contiguous), dtypes (float32, float64, bfloat16, float16,
complex64), hyperparameters (lr as float or tensor, momentum incl. 0, dampening, nesterov where valid,
weight_decay, maximize), optim_bits 32 or 8, 1-5 steps, some params skipping some steps (grad None). The
library runs side by side with a float64 implementation of torch.optim.SGD's rule written here:

    d = -g if maximize else g;  d += weight_decay * p  (if weight_decay != 0)
    if momentum != 0: buf = d (first step) else momentum * buf + (1 - dampening) * d
                      d = d + momentum * buf if nesterov else buf
    p -= lr * d

Metrics:
  * float32 / complex64 params with a full-precision buffer: max |p - p_ref| <= 1e-6 * S, where the param
    magnitude scale S = max_t max|p_ref(t)| + sum_t max|lr * d_ref(t)| (largest param entry over the run
    plus the largest update of each step); float64 params: 1e-12 * S.
  * every param (and its buffer) also within an elementwise error bound propagated step by step:
    E_p / E_b bound |p - p_ref| / |buf - buf_ref|. Each step's operations add their float32 rounding
    (unit roundoff u = 2**-24 per operation and per hyperparameter cast, relative to the magnitudes
    involved) and the storage of the result: param rounding to its dtype (bf16 2**-8, fp16 2**-11);
    a bf16/fp16 buffer's rounding; for 8-bit state the requantization, at most STORE_REL * absmax of the
    element's block (the absmax the library stored this step), STORE_REL = half the widest code gap
    relative to absmax, or 1 + q[0] (no -1.0 code), ~0.00703 <= 0.0071, plus two float32 roundings.
    Errors carried in: weight decay multiplies E_p, momentum multiplies E_b, nesterov adds momentum * the
    new buffer's error, the param moves by lr * the update's error.

Every example is reproducible: derandomize=True, no example database.
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import torchsgd8
from torchsgd8._layout import MIN_ROW_LENGTH
from torchsgd8._state import FORMAT_KEY, StateDictError
from torchsgd8.quantization import BLOCK_SIZE, absmax_per_element, signed_dynamic_map

from helpers import assert_snapshot_unchanged, optimizer_snapshot

QMAP64 = signed_dynamic_map().to(torch.float64)
Q_REL = max(((QMAP64[1:] - QMAP64[:-1]) / 2).max().item(), 1 + QMAP64[0].item())
U32 = 2.0**-24
STORE_REL = Q_REL + 2 * U32

# unit roundoff of storing a value in the param's dtype, and half the smallest subnormal (absolute error of
# a rounding that underflows)
UNIT = {torch.float32: 2.0**-24, torch.complex64: 2.0**-24, torch.float64: 2.0**-53,
        torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
TINY = {torch.float32: 2.0**-150, torch.complex64: 2.0**-150, torch.float64: 0.0,
        torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}
REL_TOL = {torch.float32: 1e-6, torch.complex64: 1e-6, torch.float64: 1e-12}

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

SHAPES = [(), (0,), (1,), (5,), (255,), (256,), (257,), (3, 85), (2, 128), (3, 300), (16, 17), (2, 0, 3), (513,)]
DTYPES = [torch.float32, torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16,
          torch.complex64]
MIN_8BIT_SIZES = [0, 1, 255, 256, 257, 300, 4096]


def test_store_rel_is_the_derived_0_0071():
    # the constant the 8-bit bound is built on
    assert 0.00703 < Q_REL <= 0.0071


# ---- strategies ----------------------------------------------------------------------------------------


@st.composite
def param_specs(draw, min_8bit_size: int, max_steps: int):
    if min_8bit_size > 1 and draw(st.booleans()):
        shape = (min_8bit_size + draw(st.sampled_from([-1, 0, 1])),)  # around the 8-bit threshold
    else:
        shape = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from(DTYPES))
    transposed = len(shape) == 2 and draw(st.booleans())  # a non-contiguous leaf param
    skipped = draw(st.sets(st.integers(0, max_steps - 1), max_size=2)) if draw(st.integers(0, 4)) == 0 else set()
    return dict(shape=shape, dtype=dtype, transposed=transposed,
                grad_scale=draw(st.sampled_from([1e-2, 1.0, 1.0, 30.0])),
                grad_transposed=len(shape) == 2 and draw(st.booleans()),
                skipped=skipped)


@st.composite
def group_specs(draw, bits: list[int], max_steps: int):
    lr = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]) | st.floats(0.0, 1.0))
    momentum = draw(st.sampled_from([0.0, 0.0, 0.9]) | st.floats(0.01, 0.99))
    dampening = draw(st.sampled_from([0.0, 0.0, 0.5]) | st.floats(0.0, 1.0))
    nesterov = momentum > 0 and dampening == 0 and draw(st.booleans())
    weight_decay = draw(st.sampled_from([0.0, 0.0, 1e-2]) | st.floats(0.0, 0.1))
    min_8bit_size = draw(st.sampled_from(MIN_8BIT_SIZES))
    group = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                 weight_decay=weight_decay, maximize=draw(st.booleans()),
                 optim_bits=draw(st.sampled_from(bits)), min_8bit_size=min_8bit_size)
    # a 1-element tensor lr / momentum (what schedules use). A zero tensor momentum is left out: it keeps a
    # buffer, unlike torch (see test_zero_tensor_momentum_with_dampening_matches_torch).
    group["lr_tensor"] = draw(st.booleans())
    group["momentum_tensor"] = momentum > 0 and draw(st.booleans())
    group["params"] = draw(st.lists(param_specs(min_8bit_size, max_steps), min_size=1, max_size=3))
    return group


@st.composite
def runs(draw, bits: list[int]):
    steps = draw(st.integers(1, 5))
    groups = draw(st.lists(group_specs(bits, steps), min_size=1, max_size=3))
    return dict(steps=steps, groups=groups, seed=draw(st.integers(0, 2**31 - 1)))


# ---- the reference ---------------------------------------------------------------------------------------


def real64(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj())
    return t.to(torch.float64).clone()


class RefParam:
    """One param's float64 trajectory under torch's rule, and the error bounds of the library's."""

    def __init__(self, p: torch.Tensor):
        self.dtype = p.dtype
        self.p = real64(p)
        self.buf = None
        self.e_p = torch.zeros_like(self.p)
        self.e_b = torch.zeros_like(self.p)
        self.scale_p = self.p.abs().max().item() if self.p.numel() else 0.0
        self.scale_updates = 0.0
        self.steps = 0

    def step(self, g: torch.Tensor, h: dict) -> torch.Tensor:
        """Advances the reference by one step; returns the bound on the new (unstored) buffer's error."""
        u = 2.0**-53 if self.dtype == torch.float64 else U32  # the kernels' accumulation type
        lr, m, c, wd = h["lr"], h["momentum"], 1.0 - h["dampening"], h["weight_decay"]
        p, e_p = self.p, self.e_p
        d = -g if h["maximize"] else g.clone()
        a_d = torch.zeros_like(d)
        if wd != 0:
            d = d + wd * p
            a_d = wd * e_p + 2 * u * (g.abs() + wd * (p.abs() + e_p))
        a_bn = None
        if m != 0:
            if self.buf is None:
                bn, a_bn = d.clone(), a_d.clone()
            else:
                bn = m * self.buf + c * d
                a_bn = m * self.e_b + c * a_d + 3 * u * (m * (self.buf.abs() + self.e_b) + c * (d.abs() + a_d))
            if h["nesterov"]:
                upd = d + m * bn
                a_u = a_d + m * a_bn + 2 * u * (d.abs() + a_d + m * (bn.abs() + a_bn))
            else:
                upd, a_u = bn, a_bn
            self.buf = bn
        else:
            upd, a_u = d, a_d
        new_p = p - lr * upd
        magnitude = new_p.abs() + e_p + lr * (upd.abs() + a_u)
        self.e_p = (e_p + lr * a_u + u * lr * (upd.abs() + a_u)
                    + (u + UNIT[self.dtype]) * magnitude + TINY[self.dtype])
        self.p = new_p
        if new_p.numel():
            self.scale_p = max(self.scale_p, new_p.abs().max().item())
            self.scale_updates += (lr * upd).abs().max().item()
        self.steps += 1
        return a_bn

    def check(self, p_lib: torch.Tensor, state: dict, a_bn, where: str) -> None:
        """Compares the library's param and buffer after a step; updates e_b from the stored buffer."""
        diff = (real64(p_lib) - self.p).abs()
        slack = 1 + 1e-9
        assert bool((diff <= self.e_p * slack).all()), (
            f"{where}: param off by {diff.max().item():.3g} beyond the propagated bound "
            f"(worst excess {(diff - self.e_p).max().item():.3g})")
        if self.dtype in REL_TOL and self.p.numel() and "state1" not in state:  # full-precision path
            scale = self.scale_p + self.scale_updates
            assert diff.max().item() <= REL_TOL[self.dtype] * scale, (
                f"{where}: max |p - p_ref| = {diff.max().item():.3g} > {REL_TOL[self.dtype]} * S (S={scale:.3g})")
        if a_bn is None:
            assert not state, f"{where}: momentum 0 must keep no state, got {sorted(state)}"
            return
        if "state1" in state:
            numel = p_lib.numel()
            absmax = state["absmax1"].to(torch.float64)
            assert state["state1"].dtype == torch.uint8 and state["state1"].shape == p_lib.shape, where
            row = math.prod(p_lib.shape[1:])
            if p_lib.dim() >= 2 and row >= MIN_ROW_LENGTH:  # blocks within each row of dim 0
                assert absmax.shape == (p_lib.shape[0], (row + BLOCK_SIZE - 1) // BLOCK_SIZE), where
            else:
                assert absmax.shape == ((numel + BLOCK_SIZE - 1) // BLOCK_SIZE,), where
            assert state["step"].item() == self.steps, f"{where}: step {state['step'].item()} != {self.steps}"
            per_elem = absmax_per_element(absmax, p_lib.shape).reshape(self.buf.shape)
            stored = QMAP64[state["state1"].long()].reshape(self.buf.shape) * per_elem
            new_e_b = a_bn + STORE_REL * per_elem
        else:
            stored = real64(state["momentum_buffer"])
            assert state["momentum_buffer"].dtype == p_lib.dtype, where
            new_e_b = a_bn + UNIT[self.dtype] * (self.buf.abs() + a_bn) + TINY[self.dtype]
        bdiff = (stored - self.buf).abs()
        assert bool((bdiff <= new_e_b * slack).all()), (
            f"{where}: buffer off by {bdiff.max().item():.3g} beyond the propagated bound "
            f"(worst excess {(bdiff - new_e_b).max().item():.3g})")
        self.e_b = new_e_b


def make_param(spec: dict, gen: torch.Generator) -> torch.Tensor:
    shape, dtype = spec["shape"], spec["dtype"]
    if spec["transposed"]:
        t = torch.randn(shape[::-1], generator=gen, dtype=dtype).t()
        assert not t.is_contiguous() or t.numel() <= 1
    else:
        t = torch.randn(shape, generator=gen, dtype=dtype)
    return t.requires_grad_()


def make_grad(spec: dict, gen: torch.Generator) -> torch.Tensor:
    shape, dtype = spec["shape"], spec["dtype"]
    if spec["grad_transposed"]:
        g = torch.randn(shape[::-1], generator=gen, dtype=dtype).t()
    else:
        g = torch.randn(shape, generator=gen, dtype=dtype)
    return (g * spec["grad_scale"]).to(dtype)


def run_and_compare(run: dict) -> None:
    gen = torch.Generator().manual_seed(run["seed"])
    groups, refs, specs = [], [], []
    for gspec in run["groups"]:
        params = [make_param(ps, gen) for ps in gspec["params"]]
        refs.append([RefParam(p) for p in params])
        specs.append(gspec)
        group = {k: gspec[k] for k in ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize",
                                       "optim_bits", "min_8bit_size")}
        if gspec["lr_tensor"]:
            group["lr"] = torch.tensor(gspec["lr"], dtype=torch.float64)
        if gspec["momentum_tensor"]:
            group["momentum"] = torch.tensor(gspec["momentum"], dtype=torch.float64)
        groups.append(dict(group, params=params))
    opt = torchsgd8.SGD(groups, lr=0.5)
    for step in range(run["steps"]):
        grads = []
        for gspec, group in zip(specs, opt.param_groups):
            for ps, p in zip(gspec["params"], group["params"]):
                p.grad = None if step in ps["skipped"] else make_grad(ps, gen)
                grads.append(p.grad)
        opt.step()
        for gi, (gspec, group) in enumerate(zip(specs, opt.param_groups)):
            for pi, (ref, p) in enumerate(zip(refs[gi], group["params"])):
                if p.grad is None:
                    continue
                a_bn = ref.step(real64(p.grad), gspec)
                where = (f"step {step}, group {gi}, param {pi} ({p.dtype}{tuple(p.shape)}, "
                         f"{'8-bit' if 'state1' in opt.state.get(p, {}) else 'full'} state)")
                ref.check(p, opt.state.get(p, {}), a_bn, where)


@settings(max_examples=300, **SETTINGS)
@given(runs(bits=[32]))
def test_full_precision_state_tracks_float64_reference(run):
    run_and_compare(run)


@settings(max_examples=300, **SETTINGS)
@given(runs(bits=[8, 8, 32]))
def test_8bit_state_stays_within_propagated_bound(run):
    run_and_compare(run)


def test_zero_tensor_momentum_with_dampening_matches_torch():
    """torch.optim.SGD decides `momentum != 0` by value, also for a tensor momentum: a zero tensor momentum
    means d = g (no buffer, no dampening). A schedule driving momentum to 0 must behave the same."""
    results = []
    for cls in (torch.optim.SGD, torchsgd8.SGD):
        p = torch.ones(3, requires_grad=True)
        opt = cls([p], lr=0.1, momentum=torch.tensor(0.0), dampening=0.5)
        for _ in range(3):
            p.grad = torch.ones(3)
            opt.step()
        results.append(p.detach().clone())
    # torch: 1 - 3 * 0.1 = 0.7
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=0)


# ---- load_state_dict fuzzing ---------------------------------------------------------------------------

GARBAGE = [None, "x", 3, -1, 1.5, float("nan"), float("inf"), [], {}, [1, 2], (0.9, 0.0), True,
           torch.tensor([1.0, 2.0]), torch.tensor(0.5), torch.zeros(3, dtype=torch.int64), object()]
VERSIONS = [0, 2, -1, "1", 1.5, [1], None, 1]
GROUP_KEYS = ["lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "params", "optim_bits",
              "min_8bit_size", "stochastic_rounding", "rounding_seed"]
RENAMES = ["momentum", "State1", "exp_avg", "absmax2", 5, "step_", "__bnb_optimizer_quant_state__"]
# what an acceptable ValueError / TypeError must talk about
CLEAR_MESSAGE = re.compile(r"state.dict|param|group|momentum|learning rate|\blr\b|'step'|qmap|absmax|state1|"
                           r"format version|dampening|weight_decay|nesterov|rounding_seed", re.IGNORECASE)

FUZZ_PARAMS = [((300,), torch.float32), ((5,), torch.float32), ((), torch.float32), ((2, 130), torch.bfloat16),
               ((257,), torch.float16), ((4,), torch.float64)]


def build_optimizer(config: dict, gen: torch.Generator, params=None):
    if params is None:
        params = [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_()
                  for shape, dtype in (FUZZ_PARAMS[i] for i in config["param_ids"])]
    split = config["split"] if len(params) > 1 else 0
    groups = [{"params": params[:split]}, {"params": params[split:]}] if split else [{"params": params}]
    groups = [dict(g, lr=0.05 * (i + 1)) for i, g in enumerate(groups)]
    opt = torchsgd8.SGD(groups, lr=0.1, momentum=config["momentum"], dampening=config["dampening"],
                        weight_decay=0.01, optim_bits=config["bits"], min_8bit_size=256,
                        stochastic_rounding=config["stochastic_rounding"])
    return opt, params


def take_steps(opt, params, steps: int, gen: torch.Generator) -> None:
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()


@st.composite
def fuzz_configs(draw):
    return dict(param_ids=draw(st.lists(st.integers(0, len(FUZZ_PARAMS) - 1), min_size=1, max_size=4,
                                        unique=True)),
                split=draw(st.integers(0, 3)),
                momentum=draw(st.sampled_from([0.9, 0.9, 0.0])),
                dampening=draw(st.sampled_from([0.0, 0.1])),
                bits=draw(st.sampled_from([8, 32])),
                stochastic_rounding=draw(st.booleans()),
                steps=draw(st.integers(1, 2)),
                seed=draw(st.integers(0, 2**20)))


def mutate_tensor(t: torch.Tensor, how: str, draw) -> object:
    if how == "dtype":
        return t.to(draw(st.sampled_from([torch.float64, torch.float16, torch.int32, torch.uint8, torch.bool])))
    if how == "flatten":
        return t.reshape(-1)
    if how == "unsqueeze":
        return t.unsqueeze(0)
    if how == "truncate":
        return t.reshape(-1)[:-1]
    if how == "extend":
        return torch.cat([t.reshape(-1), t.reshape(-1)[:1] if t.numel() else torch.zeros(1, dtype=t.dtype)])
    if how == "zero_dim":
        return t.reshape(-1)[0].clone() if t.numel() else torch.zeros((), dtype=t.dtype)
    if how == "non_contiguous":
        return torch.stack([t, t], dim=-1)[..., 0] if t.dim() else t
    if how == "nan" and t.is_floating_point():
        return torch.full_like(t, float("nan"))
    if how == "negate" and t.is_floating_point():
        return -t
    if how == "reverse":
        return t.reshape(-1).flip(0).reshape(t.shape)
    return t


TENSOR_MUTATIONS = ["dtype", "flatten", "unsqueeze", "truncate", "extend", "zero_dim", "non_contiguous", "nan",
                    "negate", "reverse"]


def mutate(sd: dict, draw) -> str:
    """Applies one random mutation in place; returns its description."""
    kind = draw(st.sampled_from([
        "drop_top", "version", "group_count", "group_drop_key", "group_garbage", "params_length",
        "drop_state", "unknown_state", "state_drop_key", "state_rename_key", "state_garbage_value",
        "state_not_dict", "tensor", "swap_states", "swap_tensor", "wrap_bnb", "step_garbage",
        "state_container", "groups_container", "group_seed",
    ]))
    groups, state = sd.get("param_groups"), sd.get("state")
    dict_groups = [g for g in groups if isinstance(g, dict)] if isinstance(groups, list) else []
    ids = [i for g in dict_groups if isinstance(g.get("params"), list) for i in g["params"]]
    if kind == "drop_top":
        key = draw(st.sampled_from(sorted(sd, key=str)))
        del sd[key]
        return f"drop top-level {key!r}"
    if kind == "version":
        sd[FORMAT_KEY] = draw(st.sampled_from(VERSIONS))
        return f"format version {sd[FORMAT_KEY]!r}"
    if kind == "groups_container":
        sd["param_groups"] = draw(st.sampled_from([None, 3, "x", {}, [3], ["ab"],
                                                            tuple(groups) if isinstance(groups, list) else ()]))
        return f"param_groups = {sd['param_groups']!r}"
    if kind == "state_container":
        values = list(state.values()) if isinstance(state, dict) else []
        sd["state"] = draw(st.sampled_from([None, 3, [], [0], {}, "x", values]))
        return f"state = {sd['state']!r}"[:60]
    if kind == "unknown_state" and isinstance(state, dict):
        state[draw(st.sampled_from([99, "0", -1]))] = {"momentum_buffer": torch.zeros(3)}
        return "state for an unknown id"
    if not dict_groups:
        return "no-op"
    g = draw(st.sampled_from(dict_groups))
    if kind == "group_count":
        if draw(st.booleans()) or len(groups) == 1:  # groups is a list here
            groups.append(copy.deepcopy(g))
            return "duplicate a param group"
        groups.pop()
        return "drop the last param group"
    if kind == "group_drop_key" and g:
        key = draw(st.sampled_from(sorted(g, key=str)))
        del g[key]
        return f"drop group key {key!r}"
    if kind == "group_seed":
        g["rounding_seed"] = draw(st.sampled_from([torch.tensor(1.5), torch.tensor([1, 2]), 7, None,
                                                   torch.tensor(3, dtype=torch.int32), torch.tensor(5)]))
        return f"rounding_seed = {g['rounding_seed']!r}"
    if kind == "group_garbage":
        key = draw(st.sampled_from(GROUP_KEYS))
        g[key] = draw(st.sampled_from(GARBAGE))
        return f"group {key!r} = {g[key]!r}"
    if kind == "params_length" and isinstance(g.get("params"), list):
        how = draw(st.sampled_from(["drop", "append", "duplicate", "strings"]))
        if how == "drop" and g["params"]:
            g["params"] = g["params"][:-1]
        elif how == "append":
            g["params"] = g["params"] + [max((i for i in ids if isinstance(i, int)), default=0) + 1]
        elif how == "duplicate" and g["params"]:
            g["params"] = g["params"] + g["params"][:1]
        elif how == "strings":
            g["params"] = [str(i) for i in g["params"]]
        return f"params {how}"
    if not isinstance(state, dict) or not state:
        return "no-op"
    pid = draw(st.sampled_from(sorted(state, key=str)))
    entry = state[pid]
    if kind == "drop_state":
        del state[pid]
        return f"drop state of {pid}"
    if kind == "state_not_dict":
        state[pid] = draw(st.sampled_from(GARBAGE))
        return f"state of {pid} = {state[pid]!r}"
    if kind == "swap_states" and len(state) > 1:
        other = draw(st.sampled_from(sorted(set(state) - {pid}, key=str)))
        state[pid], state[other] = state[other], state[pid]
        return f"swap states {pid} <-> {other}"
    if not isinstance(entry, dict) or not entry:
        return "no-op"
    key = draw(st.sampled_from(sorted(entry, key=str)))
    if kind == "state_drop_key":
        del entry[key]
        return f"drop {key!r} of {pid}"
    if kind == "state_rename_key":
        new = draw(st.sampled_from(RENAMES))
        entry[new] = entry.pop(key)
        return f"rename {key!r} -> {new!r} of {pid}"
    if kind == "state_garbage_value":
        entry[key] = draw(st.sampled_from(GARBAGE))
        return f"{key!r} of {pid} = {entry[key]!r}"
    if kind == "step_garbage":
        entry["step"] = draw(st.sampled_from([-1, -1.0, "3", None, torch.tensor([1.0, 2.0]), torch.tensor(-2.0),
                                              torch.tensor([]), 2, torch.tensor(4)]))
        return f"step of {pid} = {entry['step']!r}"
    if kind == "wrap_bnb":
        state[pid] = {"__bnb_optimizer_quant_state__": dict(entry)}
        return f"wrap state of {pid}"
    if kind == "swap_tensor" and len(state) > 1:
        other = draw(st.sampled_from(sorted(set(state) - {pid}, key=str)))
        if isinstance(state[other], dict) and key in state[other]:
            entry[key], state[other][key] = state[other][key], entry[key]
            return f"swap {key!r} between {pid} and {other}"
        return "no-op"
    if kind == "tensor" and isinstance(entry[key], torch.Tensor):
        how = draw(st.sampled_from(TENSOR_MUTATIONS))
        entry[key] = mutate_tensor(entry[key], how, draw)
        return f"{how} {key!r} of {pid}"
    return "no-op"


# No shrinking: every failure names its mutations, and shrinking several distinct failures takes minutes.
@settings(max_examples=250, phases=[Phase.explicit, Phase.generate], **SETTINGS)
@given(config=fuzz_configs(), data=st.data())
def test_load_state_dict_loads_or_raises_cleanly_and_leaves_optimizer_untouched(config, data):
    gen = torch.Generator().manual_seed(config["seed"])
    source, params = build_optimizer(config, gen)
    take_steps(source, params, config["steps"], gen)
    sd = copy.deepcopy(source.state_dict())
    mutations = [mutate(sd, data.draw) for _ in range(data.draw(st.integers(1, 3)))]
    assume(any(m != "no-op" for m in mutations))

    # the target has state of its own (one step with other gradients), which a failed load must keep
    target, _ = build_optimizer(config, gen, params=params)
    take_steps(target, params, 1, gen)
    before = optimizer_snapshot(target)
    try:
        target.load_state_dict(sd)
    except StateDictError:
        assert_snapshot_unchanged(before, optimizer_snapshot(target))
        return
    except (ValueError, TypeError) as e:
        assert CLEAR_MESSAGE.search(str(e)), f"{mutations}: unclear {type(e).__name__}: {e}"
        assert_snapshot_unchanged(before, optimizer_snapshot(target))
        return
    except Exception as e:  # noqa: BLE001 -- the property under test
        assert_snapshot_unchanged(before, optimizer_snapshot(target))
        pytest.fail(f"{mutations}: load_state_dict raised {type(e).__name__}: {e}")
    # loaded: the hyperparameters are the saved ones, and a step works
    for g, saved in zip(target.param_groups, sd["param_groups"]):
        for key in ("lr", "momentum", "dampening", "weight_decay"):
            value = saved[key]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert float(g[key]) == float(value), (mutations, key)
    try:
        take_steps(target, params, 1, gen)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{mutations}: loaded, but the next step raised {type(e).__name__}: {e}")
    layouts = ({"momentum_buffer"}, {"step", "state1", "absmax1", "qmap1"})
    for p in params:
        assert set(target.state.get(p, {})) in layouts + (set(),), (mutations, sorted(target.state[p]))
