"""Mixed precision: the GradScaler protocol, stochastic rounding of bf16 params, fp32 math for fp16/bf16.

Three parts:

1. GradScaler. The optimizers set ``_step_supports_amp_scaling``, so ``torch.amp.GradScaler("cpu")`` hands
   them ``grad_scale``/``found_inf`` and the kernels unscale (divide by a power of two: exact) and skip
   overflowing steps. References: torch.optim.SGD(fused=True) and torch's own unscale + torch.optim.SGD for
   fp32 params (bit for bit: dividing by a power of two is exact, and the update rule is torch's, fma for
   fma); torch.optim.SGD on fp32 copies for fp16/bf16 params (torch 2.13's fused CPU SGD is unusable as a
   reference for fp16/bf16: it leaves some elements of a 1000-element param unchanged).
2. Stochastic rounding of bf16 params: unbiased (statistical bounds derived below), reproducible.
3. fp16/bf16 params follow an fp32-math reference exactly.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import Tensor

import torchsgd8
from torchsgd8 import ops
from torchsgd8.quantization import ZERO_CODE

from helpers import set_same_grads

INIT_SCALE = 2.0**10
BF16_ULP_1_2 = 2.0**-7  # spacing of bf16 numbers in [1, 2)


# ---- helpers -----------------------------------------------------------------------------------------------


def _bits(t: Tensor) -> Tensor:
    """The raw bytes of a tensor (so -0.0 != 0.0 and NaN == NaN, as byte-for-byte comparison wants)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def _same_bits(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _params(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _param_bytes(opt) -> list[Tensor]:
    return [_bits(p) for p in _params(opt)]


def _state_bytes(opt) -> dict[tuple[int, str], Tensor]:
    """Every tensor of the optimizer's per-param state, as bytes, keyed by (param index, state key)."""
    out = {}
    for i, p in enumerate(_params(opt)):
        for key, value in opt.state.get(p, {}).items():
            if isinstance(value, Tensor):
                out[(i, key)] = _bits(value)
    return out


def _assert_same_bytes(a: dict | list, b: dict | list, what: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{what}: different state keys {sorted(a)} vs {sorted(b)}"
        pairs = [(k, a[k], b[k]) for k in a]
    else:
        assert len(a) == len(b)
        pairs = [(i, x, y) for i, (x, y) in enumerate(zip(a, b))]
    for key, x, y in pairs:
        assert torch.equal(x, y), f"{what}: {key} differs"


class _Net(torch.nn.Module):
    """A two-layer tanh MLP with deterministic weights (no draw from torch's default generator).

    Sizes 2048, 64, 512 and 8: with min_8bit_size=64 the first three keep 8-bit momentum, the last
    (8 elements) a full-precision buffer, so both state kinds are exercised in one optimizer.
    """

    def __init__(self, dtype: torch.dtype, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def weight(*shape):
            return torch.nn.Parameter((torch.randn(*shape, generator=g) * 0.3).to(dtype))

        self.w1, self.b1, self.w2, self.b2 = weight(64, 32), weight(64), weight(8, 64), weight(8)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


def _batches(n: int, dtype: torch.dtype, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 32, generator=g).to(dtype), torch.randn(16, 8, generator=g).to(dtype)) for _ in range(n)]


def _train(net, opt, scaler, batches, overflow_step=None, unscale_first=False) -> dict:
    """A GradScaler training loop. At `overflow_step` an inf is put into a grad after the scaled backward;
    the returned record holds bytes of params and state just before and just after that scaler.step, and
    the scale before and after scaler.update."""
    record: dict = {"scales": []}
    for i, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        loss = (net(x).float() - y.float()).pow(2).mean()
        scaler.scale(loss).backward()
        record["scales"].append(scaler.get_scale())
        if i == overflow_step:
            net.w1.grad[3, 5] = float("inf")
            record["before"] = (_param_bytes(opt), _state_bytes(opt))
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        if i == overflow_step:
            record["after"] = (_param_bytes(opt), _state_bytes(opt))
        scaler.update()
    record["final_scale"] = scaler.get_scale()
    return record


def _scaler(**kw) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=INIT_SCALE, **kw)


class _Fp32MathSGD(torch.optim.Optimizer):
    """Reference for fp16/bf16 params: every step, torch.optim.SGD (single-tensor, fp32) updates fp32 copies
    of the param and its momentum buffer, which are then rounded to nearest back into the param's dtype.

    It speaks GradScaler's protocol for fused optimizers: grads are divided by grad_scale in fp32, and on
    found_inf the step does not happen at all (as with torch.optim.SGD under a GradScaler, no state is
    created) -- the semantics of "a skipped step never happened".
    """

    def __init__(self, params, **hyper):
        super().__init__(params, {})
        self.hyper = hyper
        self._step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure=None):
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and found_inf.item() != 0:
            return None
        for p in _params(self):
            if p.grad is None:
                continue
            p32 = p.detach().float().clone()
            grad = p.grad.float()
            if grad_scale is not None:
                grad = grad / grad_scale.float()
            p32.grad = grad
            ref = torch.optim.SGD([p32], foreach=False, **self.hyper)
            if "momentum_buffer" in self.state[p]:
                ref.state[p32]["momentum_buffer"] = self.state[p]["momentum_buffer"].float()
            ref.step()
            p.copy_(p32)
            if ref.state[p32].get("momentum_buffer") is not None:
                self.state[p]["momentum_buffer"] = ref.state[p32]["momentum_buffer"].to(p.dtype)
        return None


SCALER_HYPER = {
    "nesterov-wd": dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True),
    "dampening": dict(lr=0.05, momentum=0.8, dampening=0.25),
    "plain": dict(lr=0.05),
}


# ---- 1. GradScaler -----------------------------------------------------------------------------------------


def _check_overflow_step(record, overflow_step):
    params_before, state_before = record["before"]
    params_after, state_after = record["after"]
    _assert_same_bytes(params_before, params_after, "params across the skipped step")
    _assert_same_bytes(state_before, state_after, "optimizer state across the skipped step")
    scales = record["scales"]
    assert scales[overflow_step + 1] == scales[overflow_step] * 0.5, "the scaler backs off after an overflow"


@pytest.mark.parametrize("hyper", SCALER_HYPER.values(), ids=SCALER_HYPER.keys())
def test_fp32_gradscaler_matches_torch_fused_and_unfused_sgd_bitwise(hyper):
    """fp32 params, SGD32bit under a GradScaler (growth every 3 steps, so the scale changes, and one
    overflow) equals torch.optim.SGD(fused=True) under the same scaler protocol, and torch's classic path
    (unscale_ by multiplication with 1/scale, then torch.optim.SGD), bit for bit: dividing by a power of
    two is exact either way, and the rule is torch's operation for operation."""
    steps, overflow = 10, 7  # scale: 1024 x3, 2048 x3, 4096, overflow -> 2048
    batches = _batches(steps, torch.float32)
    runs = {}
    for name, make in {
        "torchsgd8": lambda ps: torchsgd8.SGD32bit(ps, **hyper),
        "fused": lambda ps: torch.optim.SGD(ps, fused=True, **hyper),
        "unfused": lambda ps: torch.optim.SGD(ps, foreach=False, **hyper),
    }.items():
        net = _Net(torch.float32)
        opt = make(list(net.parameters()))
        record = _train(net, opt, _scaler(growth_interval=3), batches, overflow_step=overflow)
        runs[name] = (net, opt, record)

    net, opt, record = runs["torchsgd8"]
    _check_overflow_step(record, overflow)
    assert len(set(record["scales"])) >= 3, "the scale should have grown and backed off during the run"
    for name in ("fused", "unfused"):
        ref_net, ref_opt, ref_record = runs[name]
        assert record["scales"] == ref_record["scales"]
        for p, q in zip(net.parameters(), ref_net.parameters()):
            assert _same_bits(p, q), f"params differ from torch.optim.SGD ({name})"
            if "momentum" in hyper:
                assert _same_bits(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])
            else:
                assert not opt.state.get(p), "no momentum: no state, as in torch"


@pytest.mark.parametrize("hyper", [SCALER_HYPER["nesterov-wd"], SCALER_HYPER["dampening"]],
                         ids=["nesterov-wd", "dampening"])
def test_fp32_gradscaler_8bit_in_kernel_unscale_equals_unscale_first(hyper):
    """SGD8bit under a GradScaler: unscaling inside the kernel (grad_scale handed over) and the scaler's own
    unscale_() before step (the op then gets found_inf only) give the same bits; the overflow step changes
    no byte of params or state; the 8-bit `step` counter counts only the steps that happened."""
    steps, overflow = 9, 4
    batches = _batches(steps, torch.float32)
    runs = []
    for unscale_first in (False, True):
        net = _Net(torch.float32)
        opt = torchsgd8.SGD8bit(list(net.parameters()), min_8bit_size=64, **hyper)
        record = _train(net, opt, _scaler(growth_interval=3), batches, overflow, unscale_first=unscale_first)
        runs.append((net, opt, record))

    (net, opt, record), (ref_net, ref_opt, ref_record) = runs
    _check_overflow_step(record, overflow)
    _assert_same_bytes(_param_bytes(opt), _param_bytes(ref_opt), "params")
    _assert_same_bytes(_state_bytes(opt), _state_bytes(ref_opt), "state")
    kinds = {name: set(opt.state[p]) for name, p in net.named_parameters()}
    assert kinds["w1"] == kinds["b1"] == kinds["w2"] == {"step", "state1", "absmax1", "qmap1"}
    assert kinds["b2"] == {"momentum_buffer"}
    for name in ("w1", "b1", "w2"):
        assert getattr(net, name).dtype == torch.float32
        assert opt.state[getattr(net, name)]["step"].item() == steps - 1, "the skipped step must not count"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("hyper", SCALER_HYPER.values(), ids=SCALER_HYPER.keys())
def test_low_precision_gradscaler_matches_fp32_math_reference_bitwise(dtype, hyper):
    """fp16/bf16 params under a GradScaler: SGD32bit equals torch.optim.SGD on fp32 copies (grads divided by
    the scale in fp32, one rounding to nearest per step), driven by the same scaler, bit for bit."""
    steps, overflow = 8, 3
    batches = _batches(steps, dtype)
    net, ref_net = _Net(dtype), _Net(dtype)
    opt = torchsgd8.SGD32bit(list(net.parameters()), **hyper)
    ref_opt = _Fp32MathSGD(list(ref_net.parameters()), **hyper)
    record = _train(net, opt, _scaler(growth_interval=2), batches, overflow_step=overflow)
    ref_record = _train(ref_net, ref_opt, _scaler(growth_interval=2), batches, overflow_step=overflow)

    _check_overflow_step(record, overflow)
    assert record["scales"] == ref_record["scales"]
    assert not _same_bits(net.w1, _Net(dtype).w1), "training must have moved the params"
    for p, q in zip(net.parameters(), ref_net.parameters()):
        assert p.dtype == dtype
        assert _same_bits(p, q), "params differ from the fp32-math reference"
        if "momentum" in hyper:
            assert _same_bits(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_8bit_gradscaler_overflow_is_a_no_op(dtype):
    """fp16/bf16 params with 8-bit state under a GradScaler: the overflow step changes no byte, and the run
    is bit for bit the run in which that step never happened (a twin that skips the batch itself and
    halves its scale, as the scaler does on overflow)."""
    steps, overflow = 7, 3
    batches = _batches(steps, dtype)
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=0.01, min_8bit_size=64)

    net = _Net(dtype)
    opt = torchsgd8.SGD8bit(list(net.parameters()), **hyper)
    record = _train(net, opt, _scaler(), batches, overflow_step=overflow)
    _check_overflow_step(record, overflow)

    twin = _Net(dtype)
    twin_opt = torchsgd8.SGD8bit(list(twin.parameters()), **hyper)
    scaler = _scaler()
    for i, (x, y) in enumerate(batches):
        if i == overflow:
            scaler.update(new_scale=scaler.get_scale() * 0.5)
            continue
        twin_opt.zero_grad(set_to_none=True)
        scaler.scale((twin(x).float() - y.float()).pow(2).mean()).backward()
        scaler.step(twin_opt)
        scaler.update()

    assert scaler.get_scale() == record["final_scale"]
    _assert_same_bytes(_param_bytes(opt), _param_bytes(twin_opt), "params vs the run without the overflow step")
    _assert_same_bytes(_state_bytes(opt), _state_bytes(twin_opt), "state vs the run without the overflow step")
    assert opt.state[net.w1]["step"].item() == steps - 1
    assert not _same_bits(net.w1, _Net(dtype).w1), "training must have moved the params"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_in_kernel_unscale_is_exact(dtype, optim_bits, gen):
    """The GradScaler protocol by hand (what scaler.step does: set grad_scale/found_inf, step, delete them):
    grads g * S with grad_scale = S must give exactly the run with grads g. Magnitudes of g lie in
    [2**-6, 2), so g * S (S <= 2**12) is exact in fp16 (max 65504, normal down to 2**-14) and bf16, and the
    kernel's (g * S) / S in fp32 is g again."""
    sizes = (1000, 300, 7)  # with min_8bit_size=256: two 8-bit params and one full-precision buffer
    hyper = dict(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=0.05, optim_bits=optim_bits,
                 min_8bit_size=256)
    init = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    scaled = [p.clone().requires_grad_() for p in init]
    plain = [p.clone().requires_grad_() for p in init]
    opt, ref = torchsgd8.SGD(scaled, **hyper), torchsgd8.SGD(plain, **hyper)
    for scale in (2.0**10, 2.0**12, 2.0**8, 1.0, 2.0**11):
        for p, q in zip(scaled, plain):
            sign = torch.randint(0, 2, (p.numel(),), generator=gen) * 2 - 1
            magnitude = torch.exp2(torch.rand(p.numel(), generator=gen) * 7 - 6)  # [2**-6, 2)
            g = (sign * magnitude).to(dtype)
            assert torch.equal((g * scale).float() / scale, g.float())  # the premise
            p.grad, q.grad = g * scale, g.clone()
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
        del opt.grad_scale, opt.found_inf
        ref.step()
    _assert_same_bytes(_param_bytes(opt), _param_bytes(ref), "params")
    _assert_same_bytes(_state_bytes(opt), _state_bytes(ref), "state")
    if optim_bits == 8:
        assert "state1" in opt.state[scaled[0]] and "momentum_buffer" in opt.state[scaled[2]]


# A skipped step that would have been a parameter's first step. torchsgd8 creates the state before the op
# runs (never uninitialised memory, unlike torch.optim.SGD(fused=True), which allocates the buffer with
# empty_like and then reads it as a non-first step); when found_inf says the op skipped, eager step()
# forgets that state again. The guarantee is the one torch.optim.SGD gives under a GradScaler (scaler.step
# does not call step() at all on overflow): a skipped step is a no-op, so the next step is the parameter's
# first one and buf = d -- also with dampening != 0, where a zero buffer would give (1 - dampening) * d.
@pytest.mark.parametrize("dampening", [0.0, 0.5], ids=["no-dampening", "dampening"])
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_skipped_first_step_then_next_step_is_a_first_step(optim_bits, dampening):
    hyper = dict(lr=0.05, momentum=0.9, dampening=dampening, weight_decay=0.01)
    batches = _batches(3, torch.float32)

    net = _Net(torch.float32)
    opt = torchsgd8.SGD(list(net.parameters()), optim_bits=optim_bits, min_8bit_size=64, **hyper)
    scaler = _scaler()
    record = _train(net, opt, scaler, batches[:1], overflow_step=0)
    params_before, state_before = record["before"]
    _assert_same_bytes(params_before, _param_bytes(opt), "params across the skipped first step")
    assert state_before == {}, "no state before the first step"
    # the skipped first step leaves no state behind
    for name, p in net.named_parameters():
        assert p not in opt.state, f"{name}: state of a skipped first step must be forgotten"
    assert record["final_scale"] == INIT_SCALE / 2

    # twin: never saw the overflow; starts at the scale the first run has now
    twin = _Net(torch.float32)
    twin_opt = torchsgd8.SGD(list(twin.parameters()), optim_bits=optim_bits, min_8bit_size=64, **hyper)
    twin_scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE / 2)
    _train(net, opt, scaler, batches[1:])
    _train(twin, twin_opt, twin_scaler, batches[1:])
    if optim_bits == 32:  # and torch itself, under its own scaler path (it never creates state on overflow)
        ref = _Net(torch.float32)
        ref_opt = torch.optim.SGD(list(ref.parameters()), foreach=False, **hyper)
        ref_scaler = _scaler()
        _train(ref, ref_opt, ref_scaler, batches[:1], overflow_step=0)
        assert not ref_opt.state
        _train(ref, ref_opt, ref_scaler, batches[1:])
        _assert_same_bytes(_param_bytes(twin_opt), _param_bytes(ref_opt), "twin vs torch.optim.SGD")
    if optim_bits == 8:
        assert opt.state[net.w1]["step"].item() == 2
    _assert_same_bytes(_state_bytes(opt), _state_bytes(twin_opt), "state vs a run without the skipped step")
    _assert_same_bytes(_param_bytes(opt), _param_bytes(twin_opt), "params vs a run without the skipped step")


# ---- 2. stochastic rounding of bf16 params -----------------------------------------------------------------
#
# Statistics. Let x be the fp32 result of an update and lo <= x <= hi its bf16 neighbours (hi - lo = ulp).
# Stochastic rounding returns hi with probability (x - lo) / ulp, so E[result] = x and Var[result] <= ulp**2/4
# (a Bernoulli scaled by ulp). The noise is a hash of (seed, tensor, element), independent in effect across
# elements and steps, and without weight decay the update added to a param (momentum included) does not
# depend on the param, so after K steps inside one binade (constant ulp) each element's error against the exact fp32
# trajectory is a sum of K independent zero-mean terms: Var <= K * ulp**2 / 4. The mean error over N elements
# then has std <= ulp * sqrt(K) / (2 * sqrt(N)); we allow 6 of those (a false alarm has probability ~2e-9,
# and the result is deterministic for the fixed seeds anyway).

N_SR = 1 << 16
K_SR = 16


def _sr_setup(gen, n=N_SR):
    """bf16 params of magnitude in [1.25, 1.75) (ulp 2**-7), both signs; per-step grads in [0.2, 1) for a
    drift of 0.3 * 0.6 ulp per step on average: after K_SR = 16 steps ~2.9 ulp (0.022), all in [1, 2)."""
    sign = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).float()
    p0 = (sign * (1.25 + 0.5 * torch.rand(n, generator=gen))).to(torch.bfloat16)
    grads = [(0.2 + 0.8 * torch.rand(n, generator=gen)).to(torch.bfloat16) for _ in range(K_SR)]
    lr = 0.3 * BF16_ULP_1_2  # |lr * grad| <= 0.3 ulp < half an ulp: round-to-nearest never moves a param
    return p0, grads, lr


def _run_bf16(p0, grads, lr, *, seed=0, sr=True, optim_bits=32, momentum=0.0, steps=None):
    torch.manual_seed(seed)  # rounding_seed is drawn from the default generator at construction
    p = p0.clone().requires_grad_()
    opt = torchsgd8.SGD([p], lr=lr, momentum=momentum, optim_bits=optim_bits, min_8bit_size=1,
                        stochastic_rounding=sr)
    for g in grads[:steps]:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


def _fp32_trajectory(p0, grads, lr, momentum=0.0):
    p = p0.float().requires_grad_()
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum, foreach=False)
    for g in grads:
        p.grad = g.float()
        opt.step()
    return p.detach()


def test_one_stochastic_rounding_step_picks_a_neighbour_without_bias(gen):
    p0, grads, lr = _sr_setup(gen)
    p, _ = _run_bf16(p0, grads, lr, steps=1)
    exact = _fp32_trajectory(p0, grads[:1], lr)
    bits = exact.view(torch.int32)
    toward_zero = (bits >> 16).to(torch.int16)  # bf16 truncation (sign-magnitude: toward zero)
    away = toward_zero + ((bits & 0xFFFF) != 0).to(torch.int16)
    got = p.view(torch.int16)
    assert bool(((got == toward_zero) | (got == away)).all()), "result must be one of the two bf16 neighbours"
    # the fraction of elements rounded away from zero equals the mean discarded fraction, within 6 sigma
    # (Bernoulli indicators: std of their mean <= 1 / (2 sqrt(N)))
    fraction = (bits & 0xFFFF).double() / 65536.0
    rounded_away = (got == away) & (away != toward_zero)
    assert 0.05 < fraction.mean().item() < 0.95 and rounded_away.any()
    assert abs(rounded_away.double().mean().item() - fraction.mean().item()) <= 6 / (2 * math.sqrt(N_SR))


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_stochastic_rounding_tracks_fp32_where_round_to_nearest_is_stuck(optim_bits, gen):
    """Without momentum (32-bit) and with momentum whose 8-bit state is exact (8-bit: grads constant within
    each 256-element block and positive, so buf / absmax == 1.0, a code of the map)."""
    p0, grads, lr = _sr_setup(gen)
    momentum = 0.0
    if optim_bits == 8:
        momentum, lr = 0.5, lr / 2  # |buf| < 2 * max |grad|: steps stay below half an ulp
        blocks = N_SR // 256
        grads = [(0.2 + 0.8 * torch.rand(blocks, generator=gen)).repeat_interleave(256).to(torch.bfloat16)
                 for _ in grads]
    exact = _fp32_trajectory(p0, grads, lr, momentum)
    nearest, _ = _run_bf16(p0, grads, lr, sr=False, optim_bits=optim_bits, momentum=momentum)
    stochastic, opt = _run_bf16(p0, grads, lr, optim_bits=optim_bits, momentum=momentum)
    if optim_bits == 8:  # premise: the 8-bit momentum is exactly torch's fp32 buffer
        state = opt.state[opt.param_groups[0]["params"][0]]
        q = p0.float().requires_grad_()
        ref = torch.optim.SGD([q], lr=lr, momentum=momentum, foreach=False)
        for g in grads:
            q.grad = g.float()
            ref.step()
        assert torch.equal(ops.dequantize_blockwise(state["state1"], state["absmax1"]),
                           ref.state[q]["momentum_buffer"])

    assert _same_bits(nearest, p0), "round-to-nearest loses every update below half an ulp"
    drift = (exact - p0.float()).abs().mean().item()
    assert drift > 2 * BF16_ULP_1_2 * (0.5 if optim_bits == 8 else 1.0)
    assert bool((exact.abs() > 1).all() & (exact.abs() < 2).all()), "premise: one binade, constant ulp"

    # with momentum too, the update never reads the param (no weight decay): the rounding errors are still
    # sums of K independent zero-mean terms, and the bound above holds.
    error = stochastic.float() - exact
    for subset in (p0 > 0, p0 < 0, torch.ones_like(p0, dtype=torch.bool)):
        n = int(subset.sum())
        bound = 6 * BF16_ULP_1_2 * math.sqrt(K_SR) / (2 * math.sqrt(n))
        assert abs(error[subset].mean().item()) <= bound, f"biased over {n} elements"
        assert abs(error[subset].mean().item()) < drift / 10  # far from round-to-nearest's error (drift)
    assert error.abs().max().item() <= K_SR * BF16_ULP_1_2  # at most one ulp of rounding error per step


def test_stochastic_rounding_is_reproducible_from_torch_manual_seed(gen):
    p0, grads, lr = _sr_setup(gen, n=5000)
    a, opt_a = _run_bf16(p0, grads, lr, seed=7)
    b, _ = _run_bf16(p0, grads, lr, seed=7)
    c, opt_c = _run_bf16(p0, grads, lr, seed=8)
    assert _same_bits(a, b)
    assert not _same_bits(a, p0), "stochastic rounding must have moved the params"
    assert (a.view(torch.int16) != c.view(torch.int16)).sum() > 500, "another seed, other roundings"
    seed = opt_a.param_groups[0]["rounding_seed"]
    assert seed.dtype == torch.int64 and seed.dim() == 0
    _, opt_unstepped = _run_bf16(p0, grads, lr, seed=7, steps=0)
    assert seed.item() == opt_unstepped.param_groups[0]["rounding_seed"].item() + K_SR, "advances 1 per step"
    assert opt_c.param_groups[0]["rounding_seed"].item() != seed.item()


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_stochastic_rounding_state_dict_round_trip_continues_bit_identically(optim_bits, gen):
    """torch.save / torch.load(weights_only=True) of the optimizer state after 6 of 12 steps, loaded into a
    fresh optimizer constructed under another seed, continues exactly as the uninterrupted run."""
    p0, grads, lr = _sr_setup(gen, n=3000)
    kw = dict(lr=lr, momentum=0.5, optim_bits=optim_bits, min_8bit_size=512, stochastic_rounding=True)

    def fresh(values, seed):
        torch.manual_seed(seed)
        ps = [values[:2900].clone().requires_grad_(), values[2900:].clone().requires_grad_()]
        return ps, torchsgd8.SGD(ps, **kw)

    def steps(ps, opt, gs):
        for g in gs:
            ps[0].grad, ps[1].grad = g[:2900].clone(), g[2900:].clone()
            opt.step()

    full_ps, full_opt = fresh(p0, seed=3)
    steps(full_ps, full_opt, grads[:12])

    ps, opt = fresh(p0, seed=3)
    steps(ps, opt, grads[:6])
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in ps]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_ps, resumed_opt = fresh(torch.cat(saved["params"]), seed=4)
    resumed_opt.load_state_dict(saved["opt"])
    assert resumed_opt.param_groups[0]["rounding_seed"].item() == opt.param_groups[0]["rounding_seed"].item()
    steps(resumed_ps, resumed_opt, grads[6:12])

    if optim_bits == 8:
        assert "state1" in full_opt.state[full_ps[0]] and "momentum_buffer" in full_opt.state[full_ps[1]]
    _assert_same_bytes(_param_bytes(resumed_opt), _param_bytes(full_opt), "params after resuming")
    _assert_same_bytes(_state_bytes(resumed_opt), _state_bytes(full_opt), "state after resuming")
    assert resumed_opt.param_groups[0]["rounding_seed"].item() == full_opt.param_groups[0]["rounding_seed"].item()


def test_stochastic_rounding_in_memory_state_dict_load_is_independent(gen):
    """opt_b.load_state_dict(opt_a.state_dict()) in memory (no torch.save) must give opt_b its own copy of the
    rounding seed, as torch's load_state_dict deep-copies the saved param groups: stepping opt_a afterwards
    must not change what opt_b will do."""
    p0, grads, lr = _sr_setup(gen, n=3000)
    a, opt_a = _run_bf16(p0, grads, lr, seed=5, steps=3)
    b = a.clone().requires_grad_()
    torch.manual_seed(6)
    opt_b = torchsgd8.SGD([b], lr=lr, stochastic_rounding=True)
    opt_b.load_state_dict(opt_a.state_dict())
    seed_b = opt_b.param_groups[0]["rounding_seed"].item()
    a_param = opt_a.param_groups[0]["params"][0]
    for g in grads[3:8]:
        a_param.grad = g.clone()
        opt_a.step()
    assert opt_b.param_groups[0]["rounding_seed"].item() == seed_b, "stepping opt_a advanced opt_b's seed"
    for g in grads[3:8]:
        b.grad = g.clone()
        opt_b.step()
    assert _same_bits(b, a_param), "opt_b must repeat opt_a's steps exactly"


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_stochastic_rounding_does_not_depend_on_thread_count(optim_bits, gen, restore_threads):
    """Two bf16 tensors of 2**17 + 77 elements: more than two parallel grains (32768 elements), so two
    threads split each tensor; the noise is a function of (seed, tensor, element) only."""
    n = (1 << 17) + 77
    p0 = [torch.randn(n, generator=gen).to(torch.bfloat16) for _ in range(2)]
    grads = [[(torch.randn(n, generator=gen) * 1e-3).to(torch.bfloat16) for _ in range(2)] for _ in range(3)]
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert torch.get_num_threads() == threads
        torch.manual_seed(11)
        ps = [p.clone().requires_grad_() for p in p0]
        opt = torchsgd8.SGD(ps, lr=1.0, momentum=0.9, optim_bits=optim_bits, min_8bit_size=1,
                            stochastic_rounding=True)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        results.append((_param_bytes(opt), _state_bytes(opt)))
        assert not _same_bits(ps[0], p0[0])
    _assert_same_bytes(results[0][0], results[1][0], "params, 1 vs 2 threads")
    _assert_same_bytes(results[0][1], results[1][1], "state, 1 vs 2 threads")


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_stochastic_rounding_leaves_other_dtypes_and_momentum_alone(optim_bits, gen):
    """In one group with stochastic rounding: fp32 and fp16 params are bitwise those of a run without it;
    the bf16 param differs (rounding is on), while its momentum state -- which never reads the param
    without weight decay -- is bitwise the round-to-nearest run's."""
    shapes = {torch.bfloat16: (40, 50), torch.float32: (30, 70), torch.float16: (1000,)}
    init = {dt: torch.randn(*s, generator=gen).to(dt) for dt, s in shapes.items()}
    grads = [{dt: (torch.randn(*s, generator=gen) * 0.05).to(dt) for dt, s in shapes.items()} for _ in range(6)]

    def run(sr):
        torch.manual_seed(0)
        ps = {dt: v.clone().requires_grad_() for dt, v in init.items()}
        opt = torchsgd8.SGD(list(ps.values()), lr=0.1, momentum=0.9, nesterov=True, optim_bits=optim_bits,
                            min_8bit_size=1, stochastic_rounding=sr)
        for gs in grads:
            for dt, p in ps.items():
                p.grad = gs[dt].clone()
            opt.step()
        return ps, opt

    sr_ps, sr_opt = run(True)
    rn_ps, rn_opt = run(False)
    for dt in (torch.float32, torch.float16):
        assert _same_bits(sr_ps[dt], rn_ps[dt]), f"{dt} params must not be touched by stochastic rounding"
    assert not _same_bits(sr_ps[torch.bfloat16], rn_ps[torch.bfloat16])
    _assert_same_bytes(_state_bytes(sr_opt), _state_bytes(rn_opt), "momentum state")
    if optim_bits == 8:
        assert set(sr_opt.state[sr_ps[torch.bfloat16]]) == {"step", "state1", "absmax1", "qmap1"}


def test_stochastic_rounding_with_gradscaler_skip(gen):
    """bf16 + stochastic rounding + 8-bit state under the GradScaler protocol: the skipped step changes no
    byte of params or state (it does advance rounding_seed: the optimizer cannot read found_inf without a
    sync), and two such runs are bit-identical."""
    p0, grads, lr = _sr_setup(gen, n=2000)

    def run():
        torch.manual_seed(9)
        p = p0.clone().requires_grad_()
        opt = torchsgd8.SGD([p], lr=lr, momentum=0.5, optim_bits=8, min_8bit_size=1, stochastic_rounding=True)
        for i, g in enumerate(grads[:6]):
            p.grad = g * 256
            opt.grad_scale, opt.found_inf = torch.tensor(256.0), torch.tensor(float(i == 3))
            if i == 3:
                before = (_param_bytes(opt), _state_bytes(opt))
            opt.step()
            if i == 3:
                _assert_same_bytes(before[0], _param_bytes(opt), "params across the skipped step")
                _assert_same_bytes(before[1], _state_bytes(opt), "state across the skipped step")
            del opt.grad_scale, opt.found_inf
        return p.detach(), opt

    a, opt_a = run()
    b, _ = run()
    assert _same_bits(a, b) and not _same_bits(a, p0)
    assert opt_a.state[opt_a.param_groups[0]["params"][0]]["step"].item() == 5


@pytest.mark.parametrize("cls", [torchsgd8.SGD8bit, torchsgd8.SGD32bit])
def test_bnb_style_constructors_accept_stochastic_rounding(cls, gen):
    """SGD's docstring documents `stochastic_rounding` (keyword-only); SGD8bit / SGD32bit are SGD with
    optim_bits fixed and must accept it too."""
    p0, grads, lr = _sr_setup(gen, n=1000)
    torch.manual_seed(1)
    p = p0.clone().requires_grad_()
    opt = cls([p], lr=lr, momentum=0.5, min_8bit_size=1, stochastic_rounding=True)
    assert opt.param_groups[0]["stochastic_rounding"] is True
    for g in grads[:4]:
        p.grad = g.clone()
        opt.step()
    assert not _same_bits(p, p0), "tiny updates must land with stochastic rounding"
    expected_keys = {"step", "state1", "absmax1", "qmap1"} if cls is torchsgd8.SGD8bit else {"momentum_buffer"}
    assert set(opt.state[p]) == expected_keys


def test_stochastic_rounding_as_a_param_group_key(gen):
    """A group can turn stochastic rounding on (with its own seed) while the default is off."""
    p0, grads, lr = _sr_setup(gen, n=1000)
    p, q = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    # lr / 2: |lr * buf| < lr * 2 * max|grad| = 0.3 ulp, so round-to-nearest stays stuck in group 1
    opt = torchsgd8.SGD8bit([{"params": [p], "stochastic_rounding": True}, {"params": [q]}], lr=lr / 2,
                            momentum=0.5, min_8bit_size=1)
    assert "rounding_seed" in opt.param_groups[0] and "rounding_seed" not in opt.param_groups[1]
    for g in grads[:4]:
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
    assert not _same_bits(p, p0) and _same_bits(q, p0)
    assert "state1" in opt.state[p]


def _direct_op_args(dtype, optim_bits):
    params, grads = [torch.ones(300, dtype=dtype)], [torch.ones(300, dtype=dtype)]
    lr, momentum = torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)
    hyper = (lr, momentum, 0.0, 0.0, False, False, True)
    if optim_bits == 8:
        return ops.sgd8bit_update_, (params, grads, [torch.zeros(300, dtype=torch.uint8)],
                                     [torch.zeros(2)], *hyper)
    return ops.sgd_update_, (params, grads, [torch.zeros(300, dtype=dtype)], *hyper)


@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0], ids=["no-scaler", "finite", "skipped"])
@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_op_rejects_rounding_seed_for_non_bf16_params(dtype, optim_bits, found_inf):
    """rounding_seed is for bf16 params only; an argument contract must not depend on found_inf's value."""
    op, args = _direct_op_args(dtype, optim_bits)
    amp = {} if found_inf is None else dict(grad_scale=torch.tensor(1.0), found_inf=torch.tensor(found_inf))
    with pytest.raises(RuntimeError, match="bfloat16"):
        op(*args, **amp, rounding_seed=torch.tensor(5))
    op(*args, **amp)  # the same call without a seed is fine
    bf_op, bf_args = _direct_op_args(torch.bfloat16, optim_bits)
    bf_op(*bf_args, **amp, rounding_seed=torch.tensor(5))  # and a bf16 param takes the seed


# ---- 3. fp16/bf16 params: fp32 math, one rounding per step -------------------------------------------------

FP32_MATH_HYPER = {
    "plain": dict(lr=0.1),
    "nesterov-wd": dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "dampening-maximize": dict(lr=0.05, momentum=0.7, dampening=0.3, weight_decay=0.1, maximize=True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hyper", FP32_MATH_HYPER.values(), ids=FP32_MATH_HYPER.keys())
def test_low_precision_params_follow_fp32_math_reference_exactly(dtype, hyper, gen):
    """SGD32bit on fp16/bf16 params (sizes with SIMD tails, and a 2-d one) equals torch.optim.SGD applied to
    fp32 copies of param and buffer, rounded to nearest into the param's dtype after every step."""
    shapes = [(1000,), (37,), (5, 7), (1,)]
    init = [torch.randn(*s, generator=gen).to(dtype) for s in shapes]
    ps = [p.clone().requires_grad_() for p in init]
    refs = [p.clone().requires_grad_() for p in init]
    opt, ref = torchsgd8.SGD32bit(ps, **hyper), _Fp32MathSGD(refs, **hyper)
    for _ in range(8):
        set_same_grads([ps, refs], gen)
        opt.step()
        ref.step()
        for p, r in zip(ps, refs):
            assert _same_bits(p, r)
            if "momentum" in hyper:
                assert _same_bits(opt.state[p]["momentum_buffer"], ref.state[r]["momentum_buffer"])
    assert not all(_same_bits(p, q) for p, q in zip(ps, init))
    # the fp32 math matters: storage-precision arithmetic (rounding after each operation) differs
    if "momentum" in hyper:
        low = [p.clone().requires_grad_() for p in init]
        torch_low = torch.optim.SGD(low, foreach=False, **hyper)
        gen2 = torch.Generator().manual_seed(99)
        rn = [p.clone().requires_grad_() for p in init]
        ours = torchsgd8.SGD32bit(rn, **hyper)
        for _ in range(8):
            set_same_grads([low, rn], gen2)
            torch_low.step()
            ours.step()
        assert not all(_same_bits(p, r) for p, r in zip(low, rn)), "expected per-op rounding to differ"


@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rounding_ties_and_special_values(dtype, optim_bits, gen):
    """p - g lands exactly half-way between two neighbours of the low dtype (both parities), or on inf, NaN
    or a subnormal: the stored param is torch's round-to-nearest-even of the float result, in the SIMD body
    and the scalar tail alike (the AVX-512 kernels convert bf16 with their own byte permutes)."""
    n = 4099
    info = torch.finfo(dtype)
    # params k * ulp above 1 (odd and even k), grads half an ulp: every float result is a tie
    k = torch.randint(0, 2**6, (n,), generator=gen).double()
    p = (1 + k * info.eps).to(dtype)
    g = torch.full((n,), -info.eps / 2, dtype=torch.float64).to(dtype)
    g[1::3] = -g[1::3]
    special = torch.tensor([math.inf, -math.inf, math.nan, info.smallest_normal / 4, -info.tiny * 3, info.max],
                           dtype=dtype)
    p[100:106], g[100:106] = special, 0  # in the SIMD body
    p[-3:], g[-3:] = special[:3], 0      # in the scalar tail
    param = torch.nn.Parameter(p.clone())
    param.grad = g.clone()
    opt = torchsgd8.SGD([param], lr=1.0, momentum=0.9, optim_bits=optim_bits, min_8bit_size=0)
    opt.step()  # a first step: buffer = grad, param = param - grad
    expected = (p.float() - g.float()).to(dtype)
    nan = expected.isnan()
    assert torch.equal(param.isnan(), nan)
    assert torch.equal(param[~nan].view(torch.int16), expected[~nan].view(torch.int16))
