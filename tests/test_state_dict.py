"""State dicts: loading torchsgd8's own, torch.optim.SGD's and bitsandbytes' (SGD8bit, SGD32bit,
SGD(optim_bits=8); wrapped under '__bnb_optimizer_quant_state__' or not), converting the momentum to this
optimizer's precision, and rejecting broken ones with StateDictError before anything changes.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import torchsgd8
from torchsgd8 import ops
from torchsgd8._state import StateDictError
from torchsgd8._layout import MIN_ROW_LENGTH
from torchsgd8.quantization import BLOCK_SIZE, absmax_per_element, signed_dynamic_map

QMAP = signed_dynamic_map()
QMAP64 = QMAP.to(torch.float64)
# Largest |stored - value| / absmax of the codebook (half the widest code gap, or 1 + q[0] at the negative
# end, where the map stops at about -0.993 and has no -1.0). About 0.0070.
Q_REL = max(((QMAP64[1:] - QMAP64[:-1]) / 2).max().item(), 1 + QMAP64[0].item())
U32 = 2.0**-24
# what storing a value costs, relative to its block's absmax: Q_REL, plus float32 rounding of the division
# value / absmax (<= U32, as |ratio| <= 1) and of the product qmap[code] * absmax (<= U32 * absmax)
STORE_REL = Q_REL + 2 * U32
WRAP = "__bnb_optimizer_quant_state__"
LR, MOMENTUM = 0.01, 0.9


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}[t.element_size()])


def per_row(shape) -> bool:
    """Whether SGD8bit blocks a param of this shape per row (absmax1 [rows, blocks per row])."""
    return len(shape) >= 2 and math.prod(shape[1:]) >= MIN_ROW_LENGTH


def quantize_like_sgd8bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.quantize_blockwise(values, per_row=per_row(values.shape))


def decode(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """qmap[code] * absmax[block], one float32 product per element (how a saved 8-bit buffer reads back)."""
    return qmap[codes.long()] * absmax_per_element(absmax, codes.shape)


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def state_snapshot(opt) -> dict:
    """Every tensor in state_dict()['state'], cloned, keyed by (param index, key)."""
    sd = opt.state_dict()
    return {(i, k): v.clone() for i, s in sd["state"].items() for k, v in s.items() if isinstance(v, torch.Tensor)}


def unwrapped(bnb_sd: dict) -> dict:
    """bitsandbytes' state dict with the quantization keys moved back up into each param's state."""
    out = copy.deepcopy(bnb_sd)
    for pid, s in out["state"].items():
        inner = s.pop(WRAP, {})
        s.update(inner)
    return out


def torch_sgd_with_buffers(params, buffers, **hyper):
    """torch.optim.SGD whose momentum buffers are already `buffers` (the 'equivalent fp32 state')."""
    opt = torch.optim.SGD(params, foreach=False, **hyper)
    for p, b in zip(params, buffers):
        opt.state[p]["momentum_buffer"] = b.detach().clone().to(p.dtype)
    return opt


class ErrorBound:
    """Per-element bound on |8-bit run - fp32 run| (derivation in tests/test_8bit.py):
        E_{t+1} = m S_t + c w P_t,  P_{t+1} = P_t + lr E_{t+1} (nesterov: P_t + lr (w P_t + m E_{t+1})),
        S_{t+1} = E_{t+1} + STORE_REL A_{t+1},
    plus float32 rounding of both runs. `stored_error` is S_0: 0 when the 8-bit state decodes exactly to the
    fp32 run's buffer, STORE_REL * absmax when it was quantized from it on loading."""

    def __init__(self, stored_error, lr=LR, momentum=MOMENTUM, dampening=0.0, weight_decay=0.0, nesterov=False):
        self.S = stored_error.to(torch.float64)
        self.P = torch.zeros_like(self.S)
        self.lr, self.m, self.c, self.w, self.nesterov = lr, momentum, 1 - dampening, weight_decay, nesterov

    def step(self, d_ref, b_prev, b_ref, p_ref_after, absmax):
        E = self.m * self.S + self.c * self.w * self.P
        E = E + 8 * U32 * (b_ref.abs() + d_ref.abs() + self.m * b_prev.abs() + self.S)
        direction = d_ref + self.m * b_ref if self.nesterov else b_ref
        self.P = self.P + self.lr * ((self.w * self.P + self.m * E) if self.nesterov else E)
        self.P = self.P + 4 * U32 * (p_ref_after.abs() + self.lr * direction.abs())
        self.S = E + STORE_REL * absmax
        return self.P, self.S


def continue_and_compare(ours, ours_params, ref, ref_params, grads, bounds=None, weight_decay=0.0):
    """Steps both optimizers with the same grads. Params with full-precision state in `ours` must match the
    torch.optim.SGD run bit for bit; params with 8-bit state must stay within their ErrorBound. Returns the
    largest param difference seen on 8-bit params."""
    worst = 0.0
    for step_grads in grads:
        before = [(p.detach().to(torch.float64), ref.state[p]["momentum_buffer"].to(torch.float64))
                  for p in ref_params]
        set_grads(ours_params, step_grads)
        set_grads(ref_params, step_grads)
        ours.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours_params, ref_params)):
            state = ours.state[a]
            if "state1" not in state:
                assert torch.equal(bits(a), bits(b)), f"param {i} (full precision) differs from torch"
                continue
            p_before, b_prev = before[i]
            b_ref = ref.state[b]["momentum_buffer"].to(torch.float64)
            d_ref = step_grads[i].to(torch.float64) + weight_decay * p_before
            A = absmax_per_element(state["absmax1"], a.shape).to(torch.float64)
            P, S = bounds[i].step(d_ref, b_prev, b_ref, b.detach().to(torch.float64), A)
            err = (a.detach().to(torch.float64) - b.detach().to(torch.float64)).abs()
            assert bool((err <= P).all()), f"param {i}: error exceeds the bound by {(err - P).max().item()!r}"
            buf_err = (decode(state["state1"], state["absmax1"], QMAP).to(torch.float64) - b_ref).abs()
            assert bool((buf_err <= S).all()), f"param {i}: buffer error exceeds the bound"
            worst = max(worst, err.max().item())
    return worst


# --------------------------------------------------------------------------------------------------------
# bitsandbytes interop

# 8-bit in bnb: rows of 80 (under MIN_ROW_LENGTH: flat blocks as in bnb), 1-D with a partial block, rows of
# 512 (per-row blocks coincide with bnb's flat ones), rows of 300 (per-row blocks differ); 32-bit in bnb
SHAPES = [(64, 80), (4097,), (16, 512), (20, 300), (100,)]


def _bnb_factories():
    bnb = pytest.importorskip("bitsandbytes")
    return {
        "SGD8bit": lambda ps: bnb.optim.SGD8bit(ps, lr=LR, momentum=MOMENTUM),
        "SGD_optim_bits_8": lambda ps: bnb.optim.SGD(ps, lr=LR, momentum=MOMENTUM, optim_bits=8),
        "SGD32bit": lambda ps: bnb.optim.SGD32bit(ps, lr=LR, momentum=MOMENTUM),
    }


def train_bnb(kind, gen, steps=4):
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = _bnb_factories()[kind](params)
    for _ in range(steps):
        set_grads(params, [torch.randn(s, generator=gen) for s in SHAPES])
        opt.step()
    return params, opt


def bnb_equivalent_buffers(bnb_opt, params):
    """The fp32 momentum each bnb param's state stands for."""
    out = []
    for p in params:
        s = bnb_opt.state[p]
        if s["state1"].dtype == torch.uint8:
            out.append(decode(s["state1"], s["absmax1"], s["qmap1"]))
        else:
            out.append(s["state1"].clone())
    return out


@pytest.mark.parametrize("layout", ["wrapped", "unwrapped"])
@pytest.mark.parametrize("kind", ["SGD8bit", "SGD_optim_bits_8", "SGD32bit"])
def test_bitsandbytes_state_loads_into_sgd32bit_and_continues_exactly(kind, layout, gen):
    bnb_params, bnb_opt = train_bnb(kind, gen)
    sd = bnb_opt.state_dict()
    assert all(WRAP in s for s in sd["state"].values()), "bitsandbytes wraps its state; the test relies on it"
    if layout == "unwrapped":
        sd = unwrapped(sd)
    buffers = bnb_equivalent_buffers(bnb_opt, bnb_params)

    ours_params = clone_params(bnb_params)
    ours = torchsgd8.SGD32bit(ours_params, lr=0.5, momentum=0.1)  # hyperparameters come from the state dict
    ours.load_state_dict(sd)
    group = ours.param_groups[0]
    assert group["lr"] == LR and group["momentum"] == MOMENTUM and group["dampening"] == 0
    for p, buf in zip(ours_params, buffers):
        assert set(ours.state[p]) == {"momentum_buffer"}
        assert torch.equal(bits(ours.state[p]["momentum_buffer"]), bits(buf))

    ref_params = clone_params(bnb_params)
    ref = torch_sgd_with_buffers(ref_params, buffers, lr=LR, momentum=MOMENTUM)
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(25)]
    continue_and_compare(ours, ours_params, ref, ref_params, grads)


@pytest.mark.parametrize("layout", ["wrapped", "unwrapped"])
@pytest.mark.parametrize("kind", ["SGD8bit", "SGD_optim_bits_8", "SGD32bit"])
def test_bitsandbytes_state_loads_into_sgd8bit_and_continues_within_bound(kind, layout, gen):
    bnb_params, bnb_opt = train_bnb(kind, gen)
    sd = bnb_opt.state_dict()
    if layout == "unwrapped":
        sd = unwrapped(sd)
    buffers = bnb_equivalent_buffers(bnb_opt, bnb_params)

    ours_params = clone_params(bnb_params)
    ours = torchsgd8.SGD8bit(ours_params, lr=LR, momentum=MOMENTUM)
    ours.load_state_dict(sd)
    bounds = {}
    for i, (p, theirs, buf) in enumerate(zip(ours_params, bnb_params, buffers)):
        state, bnb_state = ours.state[p], bnb_opt.state[theirs]
        if p.numel() < 4096:
            assert set(state) == {"momentum_buffer"}
            assert torch.equal(bits(state["momentum_buffer"]), bits(buf))
            continue
        assert set(state) == {"step", "state1", "absmax1", "qmap1"}
        assert state["state1"].dtype == torch.uint8 and state["state1"].shape == p.shape
        assert torch.equal(state["qmap1"], QMAP)
        is_8bit = bnb_state["state1"].dtype == torch.uint8
        if is_8bit:
            assert state["step"].dtype == torch.float32 and state["step"].item() == bnb_state["step"]
        if is_8bit and (not per_row(p.shape) or p.shape[1:].numel() % BLOCK_SIZE == 0):
            # same codebook and the same blocks: codes and absmax are taken over unchanged (absmax reshaped
            # to rows of blocks where we block per row)
            assert torch.equal(state["state1"], bnb_state["state1"])
            assert torch.equal(bits(state["absmax1"]), bits(bnb_state["absmax1"].reshape(state["absmax1"].shape)))
            stored_error = torch.zeros(p.shape)
        else:
            # bnb's 32-bit buffer, or its 8-bit one whose blocks straddle our rows, is quantized on loading
            codes, absmax = quantize_like_sgd8bit(buf)
            assert torch.equal(state["state1"], codes) and torch.equal(bits(state["absmax1"]), bits(absmax))
            stored_error = STORE_REL * absmax_per_element(absmax, p.shape).to(torch.float64)
        decoded = decode(state["state1"], state["absmax1"], QMAP).to(torch.float64)
        assert bool(((decoded - buf.to(torch.float64)).abs() <= stored_error + 1e-30).all())
        bounds[i] = ErrorBound(stored_error)

    ref_params = clone_params(bnb_params)
    ref = torch_sgd_with_buffers(ref_params, buffers, lr=LR, momentum=MOMENTUM)
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(25)]
    worst = continue_and_compare(ours, ours_params, ref, ref_params, grads, bounds)
    assert worst > 0, "the 8-bit continuation must differ from the fp32 one (it quantizes)"


def test_bitsandbytes_8bit_state_read_into_smaller_min_8bit_size(gen):
    """bnb kept the 100-element param's momentum in fp32; an SGD8bit with min_8bit_size=64 quantizes it."""
    bnb_params, bnb_opt = train_bnb("SGD8bit", gen)
    ours_params = clone_params(bnb_params)
    ours = torchsgd8.SGD8bit(ours_params, lr=LR, momentum=MOMENTUM, min_8bit_size=64)
    ours.load_state_dict(bnb_opt.state_dict())
    small, bnb_small = ours_params[SHAPES.index((100,))], bnb_params[SHAPES.index((100,))]
    codes, absmax = ops.quantize_blockwise(bnb_opt.state[bnb_small]["state1"])
    assert torch.equal(ours.state[small]["state1"], codes)
    assert torch.equal(bits(ours.state[small]["absmax1"]), bits(absmax))


# --------------------------------------------------------------------------------------------------------
# torch.optim.SGD interop

TORCH_HYPER = dict(lr=0.02, momentum=0.9, dampening=0.1, weight_decay=0.01)
TORCH_SHAPES = [(64, 80), (4097,), (100,), (3, 1500)]


def train_torch(gen, steps=5):
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in TORCH_SHAPES]
    opt = torch.optim.SGD(params, **TORCH_HYPER)
    for _ in range(steps):
        set_grads(params, [torch.randn(s, generator=gen) for s in TORCH_SHAPES])
        opt.step()
    return params, opt


def test_torch_sgd_state_loads_into_sgd32bit_and_continues_bit_exactly(gen):
    params, opt = train_torch(gen)
    sd = opt.state_dict()
    ours_params = clone_params(params)
    ours = torchsgd8.SGD32bit(ours_params, lr=1.0, momentum=0.5)
    ours.load_state_dict(sd)
    for key in TORCH_HYPER:
        assert ours.param_groups[0][key] == TORCH_HYPER[key]
    for p, q in zip(ours_params, params):
        assert torch.equal(bits(ours.state[p]["momentum_buffer"]), bits(opt.state[q]["momentum_buffer"]))
    grads = [[torch.randn(s, generator=gen) for s in TORCH_SHAPES] for _ in range(20)]
    continue_and_compare(ours, ours_params, opt, params, grads)


def test_torch_sgd_state_loads_into_sgd8bit_converted_to_8bit(gen):
    params, opt = train_torch(gen)
    ours_params = clone_params(params)
    ours = torchsgd8.SGD8bit(ours_params, lr=1.0, momentum=0.5)
    ours.load_state_dict(opt.state_dict())
    bounds = {}
    for i, (p, q) in enumerate(zip(ours_params, params)):
        buf = opt.state[q]["momentum_buffer"]
        state = ours.state[p]
        if p.numel() < 4096:
            assert set(state) == {"momentum_buffer"} and torch.equal(bits(state["momentum_buffer"]), bits(buf))
            continue
        assert set(state) == {"step", "state1", "absmax1", "qmap1"}
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
        codes, absmax = quantize_like_sgd8bit(buf)
        assert torch.equal(state["state1"], codes) and torch.equal(bits(state["absmax1"]), bits(absmax))
        stored = STORE_REL * absmax_per_element(absmax, p.shape).to(torch.float64)
        bounds[i] = ErrorBound(stored, lr=TORCH_HYPER["lr"], dampening=TORCH_HYPER["dampening"],
                               weight_decay=TORCH_HYPER["weight_decay"])
    grads = [[torch.randn(s, generator=gen) for s in TORCH_SHAPES] for _ in range(20)]
    worst = continue_and_compare(ours, ours_params, opt, params, grads, bounds,
                                 weight_decay=TORCH_HYPER["weight_decay"])
    assert worst > 0


# --------------------------------------------------------------------------------------------------------
# our own states across precisions


def train_ours(cls, gen, steps=5, **kwargs):
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in TORCH_SHAPES]
    opt = cls(params, lr=LR, momentum=MOMENTUM, **kwargs)
    for _ in range(steps):
        set_grads(params, [torch.randn(s, generator=gen) for s in TORCH_SHAPES])
        opt.step()
    return params, opt


def test_our_8bit_state_loads_into_sgd32bit_dequantized(gen):
    params, opt = train_ours(torchsgd8.SGD8bit, gen)
    sd = opt.state_dict()
    ours_params = clone_params(params)
    ours = torchsgd8.SGD32bit(ours_params, lr=LR, momentum=MOMENTUM)
    ours.load_state_dict(sd)
    buffers = []
    for p, q in zip(ours_params, params):
        s = opt.state[q]
        want = (ops.dequantize_blockwise(s["state1"], s["absmax1"], torch.float32) if "state1" in s
                else s["momentum_buffer"])
        assert set(ours.state[p]) == {"momentum_buffer"}
        assert torch.equal(bits(ours.state[p]["momentum_buffer"]), bits(want))
        buffers.append(want)
    ref_params = clone_params(params)
    ref = torch_sgd_with_buffers(ref_params, buffers, lr=LR, momentum=MOMENTUM)
    grads = [[torch.randn(s, generator=gen) for s in TORCH_SHAPES] for _ in range(10)]
    continue_and_compare(ours, ours_params, ref, ref_params, grads)


def test_our_32bit_state_loads_into_sgd8bit_quantized(gen):
    params, opt = train_ours(torchsgd8.SGD32bit, gen)
    ours_params = clone_params(params)
    ours = torchsgd8.SGD8bit(ours_params, lr=LR, momentum=MOMENTUM)
    ours.load_state_dict(opt.state_dict())
    for p, q in zip(ours_params, params):
        buf = opt.state[q]["momentum_buffer"]
        if p.numel() < 4096:
            assert torch.equal(bits(ours.state[p]["momentum_buffer"]), bits(buf))
            continue
        codes, absmax = quantize_like_sgd8bit(buf)
        assert torch.equal(ours.state[p]["state1"], codes)
        assert torch.equal(bits(ours.state[p]["absmax1"]), bits(absmax))
    # it trains on from there
    set_grads(ours_params, [torch.randn(s, generator=gen) for s in TORCH_SHAPES])
    ours.step()
    assert all(torch.isfinite(p).all() for p in ours_params)


def test_format_version_1_flat_absmax_loads_into_per_row_layout(gen):
    """Version 1 kept flat blocks for every param. Where rows are whole blocks the same codes and absmax
    are taken over (absmax reshaped); where blocks straddle rows the buffer is decoded and requantized."""
    shapes = [(16, 512), (20, 300), (4097,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    buffers = [torch.randn(s, generator=gen) for s in shapes]
    flat = [ops.quantize_blockwise(b) for b in buffers]
    sd = {
        "torchsgd8_format_version": 1,
        "state": {i: {"step": torch.tensor(3.0), "state1": c, "absmax1": a, "qmap1": QMAP.clone()}
                  for i, (c, a) in enumerate(flat)},
        "param_groups": [{"lr": LR, "momentum": MOMENTUM, "dampening": 0.0, "weight_decay": 0.0,
                          "nesterov": False, "maximize": False, "params": [0, 1, 2]}],
    }
    opt = torchsgd8.SGD8bit(params, lr=LR, momentum=MOMENTUM)
    opt.load_state_dict(sd)
    aligned, straddling, vector = (opt.state[p] for p in params)
    assert torch.equal(aligned["state1"], flat[0][0]) and aligned["absmax1"].shape == (16, 2)
    assert torch.equal(bits(aligned["absmax1"]), bits(flat[0][1].reshape(16, 2)))
    want_codes, want_absmax = ops.quantize_blockwise(decode(*flat[1], QMAP), per_row=True)
    assert torch.equal(straddling["state1"], want_codes) and torch.equal(bits(straddling["absmax1"]), bits(want_absmax))
    assert torch.equal(vector["state1"], flat[2][0]) and torch.equal(bits(vector["absmax1"]), bits(flat[2][1]))
    assert all(state["step"].item() == 3 for state in (aligned, straddling, vector))
    assert opt.state_dict()["torchsgd8_format_version"] == 2
    set_grads(params, [torch.randn(s, generator=gen) for s in shapes])
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in params)


FOREIGN_QMAPS = {
    "scaled": lambda: QMAP * 0.5,
    "linear": lambda: torch.linspace(-1, 1, 256, dtype=torch.float32),
    "cubic": lambda: torch.linspace(-1, 1, 256, dtype=torch.float64).pow(3).to(torch.float32),
}


@pytest.mark.parametrize("name", list(FOREIGN_QMAPS))
def test_foreign_qmap_is_decoded_with_the_saved_qmap(name, gen):
    qmap = FOREIGN_QMAPS[name]()
    assert bool((qmap[1:] > qmap[:-1]).all()) and not torch.equal(qmap, QMAP)
    shape = (20, 300)
    n = shape[0] * shape[1]
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    absmax = torch.rand((n + BLOCK_SIZE - 1) // BLOCK_SIZE, generator=gen) * 3 + 0.1
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen))]
    sd = {
        "state": {0: {"step": 7, WRAP: {"state1": codes, "absmax1": absmax, "qmap1": qmap}}},
        "param_groups": [{"lr": LR, "betas": (MOMENTUM, 0), "eps": 0.0, "weight_decay": 0, "params": [0]}],
    }
    expected = decode(codes, absmax, qmap)

    opt32 = torchsgd8.SGD32bit(clone_params(params), lr=LR, momentum=MOMENTUM)
    opt32.load_state_dict(copy.deepcopy(sd))
    buf = opt32.state[opt32.param_groups[0]["params"][0]]["momentum_buffer"]
    assert torch.equal(bits(buf), bits(expected))

    opt8 = torchsgd8.SGD8bit(clone_params(params), lr=LR, momentum=MOMENTUM)
    opt8.load_state_dict(copy.deepcopy(sd))
    state = opt8.state[opt8.param_groups[0]["params"][0]]
    want_codes, want_absmax = quantize_like_sgd8bit(expected)
    assert torch.equal(state["state1"], want_codes)
    assert torch.equal(bits(state["absmax1"]), bits(want_absmax))
    assert torch.equal(state["qmap1"], QMAP)  # the state now speaks our codebook
    assert state["step"].item() == 7


# --------------------------------------------------------------------------------------------------------
# validation: every broken state dict raises StateDictError naming the place, and changes nothing

VALIDATION_SHAPES = [(64, 80), (100,), (4097,), (50,)]  # group 0: params 0, 1; group 1: params 2, 3


def _validation_optimizer(gen):
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in VALIDATION_SHAPES]
    opt = torchsgd8.SGD8bit([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], lr=LR,
                            momentum=MOMENTUM)
    for _ in range(2):
        set_grads(params, [torch.randn(s, generator=gen) for s in VALIDATION_SHAPES])
        opt.step()
    return params, opt


def _set(path, value):
    def mutate(sd):
        *head, last = path
        target = sd
        for key in head:
            target = target[key]
        target[last] = value(target[last]) if callable(value) else value
    return mutate


def _delete(path):
    def mutate(sd):
        *head, last = path
        target = sd
        for key in head:
            target = target[key]
        del target[last]
    return mutate


def _wrap_then(mutate):
    """Rewrites the state dict in bitsandbytes' wrapped layout, then applies `mutate`."""
    def both(sd):
        for s in sd["state"].values():
            if "state1" in s:
                s[WRAP] = {k: s.pop(k) for k in ("state1", "absmax1", "qmap1")}
        mutate(sd)
    return both


def _swap_qmap_entries(q):
    q = q.clone()
    q[10], q[11] = q[11].clone(), q[10].clone()
    return q


def _duplicate_qmap_entry(q):
    q = q.clone()
    q[200] = q[199]
    return q


BROKEN = {
    "missing_absmax1": (_delete(("state", 0, "absmax1")), r"param 0\b.*absmax1"),
    "missing_qmap1": (_delete(("state", 2, "qmap1")), r"param 2\b.*qmap1"),
    "missing_state1": (_delete(("state", 0, "state1")), r"param 0\b"),
    "state1_wrong_shape": (_set(("state", 0, "state1"), lambda v: v.reshape(-1)), r"param 0\b.*state1"),
    "state1_transposed_shape": (_set(("state", 0, "state1"), lambda v: v.t().contiguous()), r"param 0\b"),
    "state1_integer_32bit": (_set(("state", 0), lambda s: {"step": 1, "state1": torch.zeros(64, 80, dtype=torch.int32)}),
                             r"param 0\b.*state1"),
    "absmax1_float64": (_set(("state", 0, "absmax1"), lambda v: v.double()), r"param 0\b.*absmax1"),
    "absmax1_too_short": (_set(("state", 2, "absmax1"), lambda v: v[:-1].clone()), r"param 2\b.*absmax1"),
    "absmax1_too_long": (_set(("state", 0, "absmax1"), lambda v: torch.cat([v, v[:1]])), r"param 0\b.*absmax1"),
    "qmap1_wrong_size": (_set(("state", 0, "qmap1"), lambda v: v[:255].clone()), r"param 0\b.*qmap1"),
    "qmap1_not_monotone": (_set(("state", 2, "qmap1"), _swap_qmap_entries), r"param 2\b.*qmap1"),
    "qmap1_not_strictly_increasing": (_set(("state", 0, "qmap1"), _duplicate_qmap_entry), r"param 0\b.*qmap1"),
    "qmap1_float64": (_set(("state", 0, "qmap1"), lambda v: v.double()), r"param 0\b.*qmap1"),
    "step_negative": (_set(("state", 2, "step"), lambda v: torch.tensor(-1.0)), r"param 2\b.*step"),
    "unknown_key_8bit": (_set(("state", 0, "exp_avg"), torch.zeros(3)), r"param 0\b.*exp_avg"),
    "unknown_key_fp": (_set(("state", 1, "exp_avg"), torch.zeros(3)), r"param 1\b.*exp_avg"),
    "buffer_wrong_shape": (_set(("state", 1, "momentum_buffer"), lambda v: v[:-1].clone()), r"param 1\b"),
    "buffer_integer": (_set(("state", 1, "momentum_buffer"), lambda v: v.to(torch.int64)), r"param 1\b"),
    "last_param_broken": (_set(("state", 3, "momentum_buffer"), torch.zeros(7)), r"param 3\b"),
    "state_not_a_dict": (_set(("state", 1), lambda v: v["momentum_buffer"]), r"param 1\b"),
    "unknown_param_id": (lambda sd: sd["state"].__setitem__(17, {"momentum_buffer": torch.zeros(3)}), r"17"),
    "wrong_param_count": (_set(("param_groups", 0, "params"), lambda v: v[:1]), r"param group 0\b"),
    "extra_param": (_set(("param_groups", 1, "params"), lambda v: v + [9]), r"param group 1\b"),
    "too_few_groups": (_set(("param_groups",), lambda v: v[:1]), r"param groups"),
    "too_many_groups": (_set(("param_groups",), lambda v: v + [dict(v[1], params=[])]), r"param groups"),
    "invalid_group_lr": (_set(("param_groups", 1, "lr"), -1.0), r"param group"),
    "group_missing_momentum": (_delete(("param_groups", 0, "momentum")), r"param group 0\b.*momentum"),
    "format_version_3": (_set(("torchsgd8_format_version",), 3), r"version"),
    "format_version_str": (_set(("torchsgd8_format_version",), "1"), r"version"),
    "wrapped_absmax1_too_short": (_wrap_then(_set(("state", 0, WRAP, "absmax1"), lambda v: v[:-2].clone())),
                                  r"param 0\b.*absmax1"),
    "key_wrapped_and_unwrapped": (_wrap_then(lambda sd: sd["state"][2].__setitem__("absmax1", torch.zeros(17))),
                                  r"param 2\b.*absmax1"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_state_dict_raises_and_changes_nothing(case, gen):
    mutate, message = BROKEN[case]
    params, opt = _validation_optimizer(gen)
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd)

    params_before = [p.detach().clone() for p in params]
    state_before = state_snapshot(opt)
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    group_params_before = [list(g["params"]) for g in opt.param_groups]

    with pytest.raises(StateDictError, match=message):
        opt.load_state_dict(sd)

    for p, before in zip(params, params_before):
        assert torch.equal(bits(p), bits(before))
    state_after = state_snapshot(opt)
    assert state_after.keys() == state_before.keys()
    for key, value in state_before.items():
        assert value.dtype == state_after[key].dtype and torch.equal(bits(value), bits(state_after[key])), key
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    assert [list(g["params"]) for g in opt.param_groups] == group_params_before
    for g, ps in zip(opt.param_groups, group_params_before):
        assert all(a is b for a, b in zip(g["params"], ps))


def test_state_dict_error_is_a_value_error():
    assert issubclass(StateDictError, ValueError)


def test_the_unbroken_state_dict_loads(gen):
    """The validation cases above start from this state dict: it must load, so each failure is the mutation's."""
    params, opt = _validation_optimizer(gen)
    sd = copy.deepcopy(opt.state_dict())
    other = torchsgd8.SGD8bit([{"params": clone_params(params[:2])}, {"params": clone_params(params[2:])}],
                              lr=LR, momentum=MOMENTUM)
    other.load_state_dict(sd)
    for key, value in state_snapshot(opt).items():
        assert torch.equal(bits(value), bits(state_snapshot(other)[key])), key
    # and in the wrapped layout too
    wrapped = copy.deepcopy(opt.state_dict())
    _wrap_then(lambda sd: None)(wrapped)
    other.load_state_dict(wrapped)
    for key, value in state_snapshot(opt).items():
        assert torch.equal(bits(value), bits(state_snapshot(other)[key])), key
