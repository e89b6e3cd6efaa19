"""8-bit momentum: SGD8bit / SGD(optim_bits=8).

Specification under test:
  * params with numel >= min_8bit_size (fp32/bf16/fp16) keep {step, state1, absmax1, qmap1}: a 0-dim float32
    step, uint8 codes of the param's shape, float32 absmax per 256-element block, the float32[256] codebook;
    smaller params (and float64 ones) keep torch's full-precision {momentum_buffer};
  * one step per block: dequantize the buffer, apply torch.optim.SGD's rule in float32 (the param moves with
    the unquantized new buffer), take the new absmax, requantize to the nearest code;
  * bitsandbytes' `args` object and per-group optim_bits / min_8bit_size choose the precision;
  * state dicts round-trip through torch.save / torch.load(weights_only=True) without changing the run.
"""
from __future__ import annotations

import argparse
import io
import types

import pytest
import torch

import torchsgd8
from torchsgd8 import ops
from torchsgd8.quantization import BLOCK_SIZE, ZERO_CODE, absmax_per_element, signed_dynamic_map

from helpers import set_same_grads
from quant_reference import nearest_code_reference

QMAP = signed_dynamic_map()
QMAP64 = QMAP.to(torch.float64)
# Largest distance, relative to absmax, between a value and the code it is stored as: half the widest gap
# between neighbouring codes, or, below the lowest code (about -0.993; there is no -1.0), the distance
# 1 + q[0] from -1 to that code. About 0.0070.
Q_REL = max(((QMAP64[1:] - QMAP64[:-1]) / 2).max().item(), 1 + QMAP64[0].item())
U32 = 2.0**-24  # unit roundoff of float32
# what storing a value costs, relative to its block's absmax: Q_REL, plus float32 rounding of the division
# value / absmax (<= U32, as |ratio| <= 1) and of the product qmap[code] * absmax (<= U32 * absmax)
STORE_REL = Q_REL + 2 * U32


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 8: torch.int64}[t.element_size()])


def dequantized(state: dict, shape) -> torch.Tensor:
    return ops.dequantize_blockwise(state["state1"], state["absmax1"], torch.float32).reshape(shape)


def grads_for(shape, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Gradients that do not depend on the params: each block has its own scale (absmax differs by block),
    and the overall scale drifts over the run."""
    numel = torch.Size(shape).numel()
    block_scale = 10.0 ** (torch.rand((numel + BLOCK_SIZE - 1) // BLOCK_SIZE, generator=gen) * 2 - 1)
    scale = absmax_per_element(block_scale, shape)
    return [torch.randn(shape, generator=gen) * scale * (1 + 0.5 * torch.rand((), generator=gen))
            for _ in range(steps)]


# --------------------------------------------------------------------------------------------------------
# trajectories: 8-bit vs full precision, with a derived error bound

CONFIGS = {
    "momentum": dict(),
    "nesterov": dict(nesterov=True),
    "dampening": dict(dampening=0.5),
    "weight_decay": dict(weight_decay=0.05),
    "maximize": dict(maximize=True),
    "nesterov_wd": dict(nesterov=True, weight_decay=0.02),
}
SHAPES = [(4095,), (4096,), (4097,), (64, 257), (3, 2000)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", list(CONFIGS), ids=str)
def test_8bit_trajectory_stays_within_derived_bound_of_fp32(shape, config, gen):
    """Error bound, per element, derived from the update rule (m = momentum, c = 1 - dampening, w = weight
    decay, s = +-1 for maximize):

        exact run:  d_t = s g_t + w p_t,   b_{t+1} = m b_t + c d_t  (b_1 = d_0),   p_{t+1} = p_t - lr u_t,
                    u_t = b_{t+1}, or d_t + m b_{t+1} with nesterov.
        8-bit run:  the same, but b_t is read back from its stored codes, which differ from the unquantized
                    buffer by at most Q_REL * A_t (A_t = that block's absmax, recorded after every step).

    With P_t >= |p8_t - p_t|, E_t >= |unquantized 8-bit buffer - b_t| and S_t >= |stored - b_t|:
        E_{t+1} = m S_t + c w P_t        (E_1 = 0: the first step never reads a stored buffer)
        P_{t+1} = P_t + lr E_{t+1}       (nesterov: P_t + lr (w P_t + m E_{t+1}))
        S_{t+1} = E_{t+1} + STORE_REL A_{t+1}    (STORE_REL = Q_REL + float32 rounding of the quantizer)
    plus float32 rounding of both runs (a few ulps of the magnitudes involved, per step).
    """
    cfg = CONFIGS[config]
    steps, lr, m = 110, 0.01, 0.9
    c, w = 1 - cfg.get("dampening", 0.0), cfg.get("weight_decay", 0.0)
    sign = -1.0 if cfg.get("maximize", False) else 1.0
    nesterov = cfg.get("nesterov", False)
    grads = grads_for(shape, steps, gen)
    p0 = torch.randn(shape, generator=gen)
    p8 = torch.nn.Parameter(p0.clone())
    pr = torch.nn.Parameter(p0.clone())
    opt8 = torchsgd8.SGD8bit([p8], lr=lr, momentum=m, **cfg)
    ref = torch.optim.SGD([pr], lr=lr, momentum=m, foreach=False, **cfg)
    is_8bit = p0.numel() >= 4096

    P = torch.zeros(shape, dtype=torch.float64)
    S = torch.zeros(shape, dtype=torch.float64)
    worst = 0.0
    for t, g in enumerate(grads):
        p_before = pr.detach().to(torch.float64)
        b_before = ref.state[pr]["momentum_buffer"].to(torch.float64) if t else torch.zeros(shape, dtype=torch.float64)
        p8.grad, pr.grad = g.clone(), g.clone()
        opt8.step()
        ref.step()
        if not is_8bit:
            # below min_8bit_size the buffer stays full precision: exactly torch.optim.SGD
            assert set(opt8.state[p8]) == {"momentum_buffer"}
            assert torch.equal(bits(p8), bits(pr)), f"step {t}"
            continue
        d = sign * g.to(torch.float64) + w * p_before
        b_ref = ref.state[pr]["momentum_buffer"].to(torch.float64)
        E = torch.zeros(shape, dtype=torch.float64) if t == 0 else m * S + c * w * P
        E = E + 8 * U32 * (b_ref.abs() + d.abs() + m * b_before.abs() + S)
        direction = (d + m * b_ref) if nesterov else b_ref
        P = P + lr * ((w * P + m * E) if nesterov else E)
        P = P + 4 * U32 * (pr.detach().to(torch.float64).abs() + lr * direction.abs())
        A = absmax_per_element(opt8.state[p8]["absmax1"], shape).to(torch.float64)
        S = E + STORE_REL * A
        param_err = (p8.detach().to(torch.float64) - pr.detach().to(torch.float64)).abs()
        buf_err = (dequantized(opt8.state[p8], shape).to(torch.float64) - b_ref).abs()
        assert bool((param_err <= P).all()), f"step {t}: param error {(param_err - P).max().item()!r} over the bound"
        assert bool((buf_err <= S).all()), f"step {t}: buffer error {(buf_err - S).max().item()!r} over the bound"
        worst = max(worst, param_err.max().item())
    if is_8bit:
        # quantization must actually have happened: the runs differ, and by a non-negligible amount
        assert worst > 0.0
        assert worst > 1e-3 * P.max().item()


def test_8bit_trajectory_differs_from_fp32_by_small_relative_amount(gen):
    # A sanity scale check beside the per-element bound: after 150 steps the 8-bit params are close to the
    # fp32 ones compared with how far the params moved.
    shape = (64, 257)
    grads = grads_for(shape, 150, gen)
    p0 = torch.randn(shape, generator=gen)
    p8, pr = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    opt8 = torchsgd8.SGD8bit([p8], lr=0.01, momentum=0.9)
    ref = torch.optim.SGD([pr], lr=0.01, momentum=0.9)
    for g in grads:
        p8.grad, pr.grad = g.clone(), g.clone()
        opt8.step()
        ref.step()
    moved = (pr.detach() - p0).norm()
    diff = (p8.detach() - pr.detach()).norm()
    assert 0 < diff < 0.05 * moved


# --------------------------------------------------------------------------------------------------------
# one step against a pure-PyTorch reference


def reference_8bit_step(param, grad, codes, absmax, *, lr, momentum, dampening, weight_decay, nesterov,
                        maximize, per_row):
    """dequantize -> torch.optim.SGD's rule in float32 -> absmax -> nearest code (brute force).

    Written with the same torch ops torch.optim.SGD uses (add with alpha is one fused multiply-add in ATen's
    CPU kernels, mul then add for the buffer), so the result is expected bit for bit. Blocks are 256
    elements of the flattened tensor, or with per_row of each index of dim 0 (the last block of each row
    shorter). Returns (new param in the param's dtype, codes, absmax).
    """
    shape = param.shape
    p = param.detach().reshape(-1).to(torch.float32)
    d = grad.reshape(-1).to(torch.float32)
    if maximize:
        d = -d
    if weight_decay != 0:
        d = d.add(p, alpha=weight_decay)
    if codes is None:  # first step: the buffer is d itself
        buf = d.clone()
    else:
        buf = QMAP[codes.reshape(-1).long()] * absmax_per_element(absmax, shape).reshape(-1)
        buf = buf.mul(momentum).add_(d, alpha=1 - dampening)
    direction = d.add(buf, alpha=momentum) if nesterov else buf
    new_param = p.add(direction, alpha=-lr).to(param.dtype).reshape(shape)
    rows = buf.abs().reshape(shape[0] if per_row else 1, -1)
    blocks_per_row = (rows.shape[1] + BLOCK_SIZE - 1) // BLOCK_SIZE
    padded = torch.zeros(rows.shape[0], blocks_per_row * BLOCK_SIZE)
    padded[:, :rows.shape[1]] = rows
    new_absmax = padded.reshape(rows.shape[0], blocks_per_row, BLOCK_SIZE).amax(dim=2)
    if not per_row:
        new_absmax = new_absmax.reshape(-1)
    scale = absmax_per_element(new_absmax, shape).reshape(-1)
    new_codes = nearest_code_reference(buf / scale, QMAP)
    new_codes[scale == 0] = ZERO_CODE
    return new_param, new_codes.reshape(shape), new_absmax


PER_ROW_SHAPES = ((20, 257), (16, 5, 60), (257, 301))  # 8-bit state blocked per row (see below)

STEP_CONFIGS = [
    dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False),
    dict(lr=0.003, momentum=0.7, dampening=0.3, weight_decay=0.1, nesterov=False, maximize=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", STEP_CONFIGS, ids=["plain", "nesterov_wd", "damp_wd_max"])
# (20, 257), (16, 5, 60): per-row blocks (rows of 257 and 300 elements, a partial block ending each row);
# (257, 301): the same, big enough for two threads, whose shares then split a row;
# (4097,), (50, 100): flat blocks (1-D; rows shorter than MIN_ROW_LENGTH)
@pytest.mark.parametrize("shape", [*PER_ROW_SHAPES, (4097,), (50, 100)], ids=str)
def test_8bit_step_matches_pure_pytorch_reference_bitwise(shape, cfg, dtype, gen):
    p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
    opt = torchsgd8.SGD8bit([p], **cfg)
    for t in range(8):
        g = (torch.randn(shape, generator=gen) * (1 + t)).to(dtype)
        if t == 4:
            g.view(-1)[:BLOCK_SIZE] = 0  # with m * 0: a block that stays non-zero through momentum only
        state = opt.state[p]
        codes = state["state1"].clone() if state else None
        absmax = state["absmax1"].clone() if state else None
        want_p, want_codes, want_absmax = reference_8bit_step(p, g, codes, absmax, **cfg,
                                                              per_row=shape in PER_ROW_SHAPES)
        p.grad = g
        opt.step()
        state = opt.state[p]
        assert p.dtype == dtype
        assert state["state1"].dtype == torch.uint8 and state["absmax1"].dtype == torch.float32
        assert torch.equal(bits(state["absmax1"]), bits(want_absmax)), f"step {t}: absmax"
        assert torch.equal(state["state1"], want_codes), f"step {t}: {(state['state1'] != want_codes).sum()} codes"
        assert torch.equal(bits(p), bits(want_p)), f"step {t}: params"
        assert state["step"].item() == t + 1


def test_zero_gradient_block_stays_zero_block(gen):
    p = torch.nn.Parameter(torch.randn(4 * BLOCK_SIZE + 40, generator=gen))
    opt = torchsgd8.SGD8bit([p], lr=0.1, momentum=0.9, min_8bit_size=0)
    for _ in range(3):
        g = torch.randn(p.shape, generator=gen)
        g[BLOCK_SIZE:2 * BLOCK_SIZE] = 0
        before = p.detach()[BLOCK_SIZE:2 * BLOCK_SIZE].clone()
        p.grad = g
        opt.step()
        state = opt.state[p]
        assert state["absmax1"][1].item() == 0.0
        assert (state["state1"][BLOCK_SIZE:2 * BLOCK_SIZE] == ZERO_CODE).all()
        assert torch.equal(p.detach()[BLOCK_SIZE:2 * BLOCK_SIZE], before)
        assert not torch.isnan(p.detach()).any()


def test_bf16_params_with_8bit_state_train(gen):
    """bf16 params keep 8-bit state and follow torch.optim.SGD's bf16 run (bf16 buffer) closely: both round the param to
    bf16 every step; they differ only through the quantized buffer."""
    shape = (32, 300)
    p0 = torch.randn(shape, generator=gen).to(torch.bfloat16)
    p8 = torch.nn.Parameter(p0.clone())
    p32 = torch.nn.Parameter(p0.clone())
    opt8 = torchsgd8.SGD8bit([p8], lr=0.01, momentum=0.9)
    opt32 = torch.optim.SGD([p32], lr=0.01, momentum=0.9)
    target = torch.randn(shape, generator=gen)
    for _ in range(100):
        for p in (p8, p32):
            p.grad = (p.detach().float() - target).to(torch.bfloat16)  # grad of 0.5 |p - target|^2
        opt8.step()
        opt32.step()
    state = opt8.state[p8]
    assert set(state) == {"step", "state1", "absmax1", "qmap1"}
    assert state["state1"].dtype == torch.uint8 and state["state1"].shape == shape
    assert p8.dtype == torch.bfloat16
    start = (p0.float() - target).norm()
    # the quadratic converges: both runs end far closer to the target than they started
    assert (p8.detach().float() - target).norm() < 0.1 * start
    assert (p8.detach().float() - p32.detach().float()).norm() < 0.02 * start


# --------------------------------------------------------------------------------------------------------
# state layout


# shape -> absmax1's shape: flat blocks for 1-D params and rows under 128 elements, else per row
ABSMAX_SHAPES = {
    (4096,): (16,), (4097,): (17,), (10000,): (40,), (64, 257): (64, 2), (3, 5, 300): (3, 6),
    (40, 128): (40, 1), (50, 127): (25,), (40, 64, 2): (40, 1), (4096, 1): (16,), (8, 1024): (8, 4),
}


@pytest.mark.parametrize("shape", list(ABSMAX_SHAPES), ids=str)
def test_8bit_state_keys_dtypes_shapes(shape, gen):
    p = torch.nn.Parameter(torch.randn(shape, generator=gen))
    opt = torchsgd8.SGD8bit([p], lr=0.1, momentum=0.9)
    assert len(opt.state) == 0  # state is created by the first step
    for k in range(2):
        p.grad = torch.randn(shape, generator=gen)
        opt.step()
        state = opt.state[p]
        assert set(state) == {"step", "state1", "absmax1", "qmap1"}
        assert state["step"].dtype == torch.float32 and state["step"].dim() == 0
        assert state["step"].item() == k + 1
        assert state["state1"].dtype == torch.uint8 and state["state1"].shape == p.shape
        assert state["absmax1"].dtype == torch.float32
        assert state["absmax1"].shape == ABSMAX_SHAPES[shape]
        assert state["qmap1"].dtype == torch.float32 and torch.equal(state["qmap1"], QMAP)


def test_sgd_with_optim_bits_8_is_sgd8bit(gen):
    p = torch.nn.Parameter(torch.randn(5000, generator=gen))
    q = torch.nn.Parameter(p.detach().clone())
    a = torchsgd8.SGD([p], lr=0.1, momentum=0.9, optim_bits=8)
    b = torchsgd8.SGD8bit([q], lr=0.1, momentum=0.9)
    for _ in range(3):
        g = torch.randn(5000, generator=gen)
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert set(a.state[p]) == {"step", "state1", "absmax1", "qmap1"}
    assert torch.equal(bits(p), bits(q)) and torch.equal(a.state[p]["state1"], b.state[q]["state1"])


@pytest.mark.parametrize("numel,min_size,expect_8bit", [
    (4095, 4096, False), (4096, 4096, True), (4097, 4096, True), (100, 100, True), (99, 100, False),
    (1, 0, True),
])
def test_min_8bit_size_threshold(numel, min_size, expect_8bit, gen):
    p = torch.nn.Parameter(torch.randn(numel, generator=gen))
    opt = torchsgd8.SGD8bit([p], lr=0.1, momentum=0.9, min_8bit_size=min_size)
    p.grad = torch.randn(numel, generator=gen)
    opt.step()
    if expect_8bit:
        assert set(opt.state[p]) == {"step", "state1", "absmax1", "qmap1"}
    else:
        assert set(opt.state[p]) == {"momentum_buffer"}
        assert opt.state[p]["momentum_buffer"].dtype == p.dtype


def test_small_params_keep_momentum_buffer_and_match_torch(gen):
    shapes = [(10,), (64, 63), (4095,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = torchsgd8.SGD8bit(ours, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
    ref = torch.optim.SGD(theirs, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
    for _ in range(20):
        set_same_grads([ours, theirs], gen)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        assert set(opt.state[a]) == {"momentum_buffer"}
        assert torch.equal(bits(a), bits(b))
        assert torch.equal(bits(opt.state[a]["momentum_buffer"]), bits(ref.state[b]["momentum_buffer"]))


def test_float64_params_keep_full_precision_state(gen):
    p = torch.nn.Parameter(torch.randn(5000, generator=gen, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    opt = torchsgd8.SGD8bit([p], lr=0.05, momentum=0.9, dampening=0.1)
    ref = torch.optim.SGD([q], lr=0.05, momentum=0.9, dampening=0.1)
    for _ in range(10):
        g = torch.randn(5000, generator=gen, dtype=torch.float64)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    assert set(opt.state[p]) == {"momentum_buffer"}
    assert opt.state[p]["momentum_buffer"].dtype == torch.float64
    assert torch.equal(bits(p), bits(q))


def test_no_momentum_means_no_state(gen):
    p = torch.nn.Parameter(torch.randn(5000, generator=gen))
    q = torch.nn.Parameter(p.detach().clone())
    opt = torchsgd8.SGD8bit([p], lr=0.1)
    ref = torch.optim.SGD([q], lr=0.1)
    g = torch.randn(5000, generator=gen)
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    ref.step()
    assert not opt.state.get(p)
    assert torch.equal(bits(p), bits(q))


def test_qmap_is_shared_and_state_is_about_1_016_bytes_per_element(gen):
    sizes = [1_000_000, 300_000 + 5]
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    opt = torchsgd8.SGD8bit(params, lr=0.1, momentum=0.9)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    qmaps = {opt.state[p]["qmap1"].data_ptr() for p in params}
    assert len(qmaps) == 1, "one codebook per device, shared by every 8-bit param"
    for p in params:
        state = opt.state[p]
        per_element_bytes = sum(state[k].numel() * state[k].element_size() for k in ("state1", "absmax1"))
        per_element_bytes /= p.numel()
        # 1 byte per code + 4 bytes of absmax per 256 elements = 1.015625
        assert abs(per_element_bytes - (1 + 4 / BLOCK_SIZE)) < 1e-4
        assert per_element_bytes < 1.017


# --------------------------------------------------------------------------------------------------------
# bitsandbytes' args object and per-group precision


def _state_kind(opt, p) -> str:
    state = opt.state[p]
    if "state1" in state:
        return "8bit"
    return "fp" if "momentum_buffer" in state else "none"


def _step_once(opt, gen):
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=gen)
    opt.step()


def test_args_object_sets_precision_and_ignores_unrelated_attributes(gen):
    args = types.SimpleNamespace(optim_bits=8, min_8bit_size=300, percentile_clipping=100, max_unorm=0.0,
                                 skip_zeros=False, block_wise=True, lr=123.0, momentum=0.1, batch_size=7,
                                 model="resnet")
    big, small = torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(299))
    opt = torchsgd8.SGD([big, small], lr=0.1, momentum=0.9, optim_bits=32, args=args)
    group = opt.param_groups[0]
    assert group["optim_bits"] == 8 and group["min_8bit_size"] == 300
    assert group["lr"] == 0.1 and group["momentum"] == 0.9  # only optim_bits / min_8bit_size are read
    _step_once(opt, gen)
    assert _state_kind(opt, big) == "8bit" and _state_kind(opt, small) == "fp"


def test_args_object_overrides_class_precision(gen):
    p = torch.nn.Parameter(torch.randn(5000))
    opt = torchsgd8.SGD8bit([p], lr=0.1, momentum=0.9, args=types.SimpleNamespace(optim_bits=32))
    _step_once(opt, gen)
    assert _state_kind(opt, p) == "fp"
    q = torch.nn.Parameter(torch.randn(100))
    opt = torchsgd8.SGD32bit([q], lr=0.1, momentum=0.9, args=types.SimpleNamespace(optim_bits=8, min_8bit_size=64))
    _step_once(opt, gen)
    assert _state_kind(opt, q) == "8bit"


def test_args_object_with_some_fields_keeps_keyword_values_for_the_rest(gen):
    p = torch.nn.Parameter(torch.randn(500))
    opt = torchsgd8.SGD([p], lr=0.1, momentum=0.9, optim_bits=8, args=types.SimpleNamespace(min_8bit_size=500))
    assert opt.param_groups[0]["optim_bits"] == 8
    _step_once(opt, gen)
    assert _state_kind(opt, p) == "8bit"


def test_argparse_namespace_like_bitsandbytes_defaults(gen):
    parser = argparse.ArgumentParser()
    parser.add_argument("--optim_bits", type=int, default=32)
    parser.add_argument("--min_8bit_size", type=int, default=4096)
    parser.add_argument("--percentile_clipping", type=int, default=100)
    parser.add_argument("--max_unorm", type=float, default=0.0)
    parser.add_argument("--skip_zeros", action="store_true")
    parser.add_argument("--block_wise", type=bool, default=True)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(["--optim_bits", "8", "--min_8bit_size", "1000"])
    p = torch.nn.Parameter(torch.randn(1000))
    opt = torchsgd8.SGD([p], lr=0.1, momentum=0.9, args=args)
    _step_once(opt, gen)
    assert _state_kind(opt, p) == "8bit"


@pytest.mark.parametrize("field,value", [
    ("percentile_clipping", 5), ("max_unorm", 1.0), ("skip_zeros", True), ("block_wise", False),
])
def test_args_unsupported_features_raise_not_implemented(field, value):
    args = types.SimpleNamespace(optim_bits=8, min_8bit_size=4096, percentile_clipping=100, max_unorm=0.0,
                                 skip_zeros=False, block_wise=True)
    setattr(args, field, value)
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(NotImplementedError, match=field):
        torchsgd8.SGD([p], lr=0.1, momentum=0.9, args=args)
    with pytest.raises(NotImplementedError, match=field):
        torchsgd8.SGD8bit([p], lr=0.1, momentum=0.9, args=args)


def test_per_group_precision_overrides(gen):
    big_default = torch.nn.Parameter(torch.randn(5000))
    big_fp32 = torch.nn.Parameter(torch.randn(5000))
    small_8bit = torch.nn.Parameter(torch.randn(300))
    small_default = torch.nn.Parameter(torch.randn(300))
    opt = torchsgd8.SGD(
        [
            {"params": [big_default, small_default]},
            {"params": [big_fp32], "optim_bits": 32},
            {"params": [small_8bit], "min_8bit_size": 256},
        ],
        lr=0.1, momentum=0.9, optim_bits=8,
    )
    _step_once(opt, gen)
    assert _state_kind(opt, big_default) == "8bit"
    assert _state_kind(opt, small_default) == "fp"
    assert _state_kind(opt, big_fp32) == "fp"
    assert _state_kind(opt, small_8bit) == "8bit"
    # and the reverse: a 32-bit optimizer with one 8-bit group
    p = torch.nn.Parameter(torch.randn(5000))
    q = torch.nn.Parameter(torch.randn(5000))
    opt = torchsgd8.SGD32bit([{"params": [p], "optim_bits": 8}, {"params": [q]}], lr=0.1, momentum=0.9)
    _step_once(opt, gen)
    assert _state_kind(opt, p) == "8bit" and _state_kind(opt, q) == "fp"


@pytest.mark.parametrize("override", [{"optim_bits": 16}, {"optim_bits": 4}, {"min_8bit_size": -1},
                                      {"min_8bit_size": 1.5}])
def test_invalid_per_group_precision_is_rejected(override):
    p = torch.nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError):
        torchsgd8.SGD([{"params": [p], **override}], lr=0.1, momentum=0.9)


# --------------------------------------------------------------------------------------------------------
# state dict round trip


def _make_model(gen):
    shapes = [(64, 257), (4097,), (37,), (4096,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _make_opt(params):
    return torchsgd8.SGD8bit(
        [{"params": params[:2], "nesterov": True, "weight_decay": 0.01},
         {"params": params[2:], "lr": 0.02, "dampening": 0.2}],
        lr=0.05, momentum=0.9,
    )


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.clone()
        opt.step()


def _trained(params, grads, state_dict=None):
    """A copy of `params` and a _make_opt optimizer over it that loaded `state_dict` (if given), then ran
    _run with `grads`."""
    copy = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = _make_opt(copy)
    if state_dict is not None:
        opt.load_state_dict(state_dict)
    _run(opt, copy, grads)
    return copy, opt


def _state_tensors(opt) -> dict:
    """Every tensor of state_dict(), cloned, keyed by (param index, key)."""
    sd = opt.state_dict()
    return {(i, k): v.clone() for i, s in sd["state"].items() for k, v in s.items() if isinstance(v, torch.Tensor)}


def test_state_dict_round_trip_through_torch_save_continues_bit_identically(gen):
    params = _make_model(gen)
    grads = [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(40)]

    whole, whole_opt = _trained(params, grads)
    first, first_opt = _trained(params, grads[:15])
    sd = first_opt.state_dict()
    assert sd["torchsgd8_format_version"] == 2
    assert set(sd["state"][0]) == {"step", "state1", "absmax1", "qmap1"}
    assert set(sd["state"][2]) == {"momentum_buffer"}
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": sd}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    resumed, resumed_opt = _trained(loaded["params"], grads[15:], loaded["optimizer"])
    assert resumed_opt.param_groups[0]["nesterov"] is True and resumed_opt.param_groups[1]["lr"] == 0.02

    for a, b in zip(whole, resumed):
        assert torch.equal(bits(a), bits(b))
    assert _state_tensors(whole_opt).keys() == _state_tensors(resumed_opt).keys()
    for key, value in _state_tensors(whole_opt).items():
        other = _state_tensors(resumed_opt)[key]
        assert value.dtype == other.dtype and torch.equal(value, other), key
    assert resumed_opt.state[resumed[0]]["step"].item() == 40


def test_loaded_state_does_not_alias_the_state_dict(gen):
    params = _make_model(gen)
    opt = _make_opt(params)
    _run(opt, params, [[torch.randn(p.shape, generator=gen) for p in params]])
    sd = opt.state_dict()
    _, other = _trained(params, [], sd)
    before = _state_tensors(other)
    _run(opt, params, [[torch.randn(p.shape, generator=gen) for p in params]])  # mutates sd's tensors
    after = _state_tensors(other)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_param_without_state_gets_state_after_loading(gen):
    """A param that had no gradient before the checkpoint has no state; after loading, its first gradient
    must create state as usual (as torch.optim.SGD does), and the run must match an uninterrupted one."""
    params = _make_model(gen)
    grads = [[torch.randn(p.shape, generator=gen) if (t >= 3 or i != 1) else None for i, p in enumerate(params)]
             for t in range(6)]
    whole, _ = _trained(params, grads)
    first, first_opt = _trained(params, grads[:2])
    sd = first_opt.state_dict()
    assert 1 not in sd["state"]
    resumed, _ = _trained(first, grads[2:], sd)
    for a, b in zip(whole, resumed):
        assert torch.equal(bits(a), bits(b))


# --------------------------------------------------------------------------------------------------------
# threads


def test_8bit_steps_do_not_depend_on_thread_count(gen, restore_threads):
    shapes = [(600, 1000), (4097,), (64, 257), (5000,)]
    p0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        params = [torch.nn.Parameter(p.clone()) for p in p0]
        opt = torchsgd8.SGD8bit(params, lr=0.01, momentum=0.9, weight_decay=0.01, nesterov=True)
        _run(opt, params, grads)
        results.append((params, opt))
    (pa, oa), (pb, ob) = results
    for a, b in zip(pa, pb):
        assert torch.equal(bits(a), bits(b))
        assert torch.equal(oa.state[a]["state1"], ob.state[b]["state1"])
        assert torch.equal(bits(oa.state[a]["absmax1"]), bits(ob.state[b]["absmax1"]))
