"""Leaving torchsgd8: to_torch_state_dict and to_bitsandbytes_state_dict give state dicts that the real
torch.optim.SGD and bitsandbytes SGD8bit / SGD32bit load, with the momentum kept, and training goes on
from there as it would have in torchsgd8."""
from __future__ import annotations

import copy

import pytest
import torch

import torchsgd8
from torchsgd8._state import BNB_WRAPPED_KEY, StateDictError

from helpers import assert_identical, set_same_grads

bnb = pytest.importorskip("bitsandbytes")

# (shape, what it exercises): per-row 8-bit state whose rows are whole 256-blocks (bitsandbytes' blocks
# exactly), per-row with partial blocks (requantized for bitsandbytes), flat 8-bit, a small fp32 buffer
SHAPES = [(8, 512), (64, 300), (5000,), (10,)]
OWN_GROUP_KEYS = {"optim_bits", "min_8bit_size", "stochastic_rounding", "rounding_seed"}


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in SHAPES]


def _copies(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _trained(opt_class, params, steps=3, **kwargs):
    opt = opt_class(params, **{"lr": 0.05, "momentum": 0.9, "min_8bit_size": 1000, **kwargs})
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        set_same_grads([params], gen)
        opt.step()
    return opt


def _momentum(opt, p):
    """p's momentum in opt as float32 values (8-bit state decoded)."""
    state = opt.state[p]
    if "momentum_buffer" in state:
        return state["momentum_buffer"].float()
    return torchsgd8.ops.dequantize_blockwise(state["state1"], state["absmax1"])


def _continue(pairs, steps=3, seed=2):
    """Steps each (optimizer, params) pair on the same fresh grads."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        set_same_grads([params for _, params in pairs], gen)
        for opt, _ in pairs:
            opt.step()


# ---- torch.optim.SGD ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_class", [torchsgd8.SGD8bit, torchsgd8.SGD32bit])
def test_torch_sgd_loads_the_momentum_and_trains_on_as_torchsgd8_would(opt_class):
    """torch.optim.SGD gets every param's momentum (8-bit state decoded), and its next steps are bit for
    bit those of torchsgd8.SGD32bit holding the same momentum."""
    params = _params()
    opt = _trained(opt_class, params, nesterov=True)
    exported = torchsgd8.to_torch_state_dict(opt.state_dict())

    torch_params = _copies(params)
    torch_opt = torch.optim.SGD(torch_params, lr=0.1)
    torch_opt.load_state_dict(exported)
    for p, q in zip(params, torch_params):
        assert torch.equal(torch_opt.state[q]["momentum_buffer"], _momentum(opt, p))
    group = torch_opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.05, 0.9, True)
    assert not OWN_GROUP_KEYS & group.keys()

    ours_params = _copies(params)
    ours = torchsgd8.SGD32bit(ours_params)
    ours.load_state_dict(opt.state_dict())  # 8-bit state is decoded into fp32 buffers on loading
    _continue([(torch_opt, torch_params), (ours, ours_params)])
    for p, q in zip(torch_params, ours_params):
        assert torch.equal(p, q)


def test_loading_the_raw_state_dict_into_torch_sgd_would_drop_the_8bit_momentum():
    """Why the export exists: torch.optim.SGD takes torchsgd8's 8-bit keys without complaint, and has no
    momentum_buffer afterwards, so its next step would restart the momentum."""
    params = _params()
    opt = _trained(torchsgd8.SGD8bit, params)
    torch_opt = torch.optim.SGD(_copies(params), lr=0.1)
    torch_opt.load_state_dict(opt.state_dict())
    assert "momentum_buffer" not in torch_opt.state[torch_opt.param_groups[0]["params"][0]]
    torch_opt.load_state_dict(torchsgd8.to_torch_state_dict(opt.state_dict()))
    assert "momentum_buffer" in torch_opt.state[torch_opt.param_groups[0]["params"][0]]


def test_torch_export_keeps_names_groups_and_tensor_lr_and_shares_no_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Linear(40, 3))
    named = list(model.named_parameters())
    opt = torchsgd8.SGD8bit([{"params": named[:2], "lr": torch.tensor(0.5)}, {"params": named[2:]}],
                            lr=0.1, momentum=torch.tensor(0.9), weight_decay=0.01, min_8bit_size=1000,
                            stochastic_rounding=True)
    model(torch.randn(5, 64)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    before = copy.deepcopy(saved)
    exported = torchsgd8.to_torch_state_dict(saved)
    assert [g["param_names"] for g in exported["param_groups"]] == [["0.weight", "0.bias"], ["1.weight", "1.bias"]]
    assert [g["params"] for g in exported["param_groups"]] == [[0, 1], [2, 3]]
    assert isinstance(exported["param_groups"][0]["lr"], torch.Tensor) and exported["param_groups"][1]["lr"] == 0.1
    assert all(type(g["momentum"]) is float and not OWN_GROUP_KEYS & g.keys() for g in exported["param_groups"])
    for value in exported["state"].values():
        value["momentum_buffer"].add_(1)
    exported["param_groups"][0]["lr"].add_(1)
    assert_identical(opt.state_dict(), before)  # nothing shared with the optimizer

    torch_model = copy.deepcopy(model)
    torch_opt = torch.optim.SGD([{"params": list(torch_model.named_parameters())[:2]},
                                 {"params": list(torch_model.named_parameters())[2:]}])
    torch_opt.load_state_dict(torchsgd8.to_torch_state_dict(saved))
    assert torch_opt.param_groups[1]["weight_decay"] == 0.01


def test_torch_export_casts_to_the_params_dtype_when_torch_loads_it():
    params = _params(torch.bfloat16)
    opt = _trained(torchsgd8.SGD8bit, params)
    torch_params = _copies(params)
    torch_opt = torch.optim.SGD(torch_params)
    torch_opt.load_state_dict(torchsgd8.to_torch_state_dict(opt.state_dict()))
    for p, q in zip(params, torch_params):
        assert torch.equal(torch_opt.state[q]["momentum_buffer"], _momentum(opt, p).to(torch.bfloat16))


# ---- bitsandbytes ------------------------------------------------------------------------------------------

def test_bitsandbytes_sgd8bit_loads_the_8bit_state():
    """bitsandbytes.optim.SGD8bit loads the export: codes and absmax unchanged where its blocks are
    torchsgd8's, requantized within quantization error elsewhere, step counts kept; the fp32 buffer of
    the small param is kept as it is; torchsgd8 reads bitsandbytes' state dict back with the same values."""
    params = _params()
    opt = _trained(torchsgd8.SGD8bit, params)
    exported = torchsgd8.to_bitsandbytes_state_dict(opt.state_dict())
    bnb_params = _copies(params)
    bnb_opt = bnb.optim.SGD8bit(bnb_params, lr=1.0, momentum=0.5, min_8bit_size=1000)
    bnb_opt.load_state_dict(exported)
    assert bnb_opt.param_groups[0]["lr"] == 0.05 and bnb_opt.param_groups[0]["betas"] == (0.9, 0)

    for p, q, shape in zip(params, bnb_params, SHAPES):
        ours, theirs = opt.state[p], bnb_opt.state[q]
        if shape == (10,):
            assert theirs["step"] == 1 and torch.equal(theirs["state1"], ours["momentum_buffer"])
            continue
        assert theirs["step"] == 3
        assert torch.equal(theirs["qmap1"], ours["qmap1"])
        assert theirs["absmax1"].shape == (-(-q.numel() // 256),)
        if shape == (64, 300):  # rows of 300: requantized in blocks of the flattened tensor
            decoded = torchsgd8.ops.dequantize_blockwise(theirs["state1"], theirs["absmax1"])
            # nearest codes of a 256-entry map: off by at most half its widest gap (0.5 * 0.0359) of a block's absmax
            assert ((decoded - _momentum(opt, p)).abs() <= 0.018 * ours["absmax1"].max()).all()
        else:
            assert torch.equal(theirs["state1"], ours["state1"])
            assert torch.equal(theirs["absmax1"], ours["absmax1"].reshape(-1))

    back = torchsgd8.SGD8bit(_copies(params), min_8bit_size=1000)
    back.load_state_dict(bnb_opt.state_dict())
    for p, q in zip(params, back.param_groups[0]["params"]):
        torch.testing.assert_close(_momentum(back, q), _momentum(opt, p), rtol=0, atol=0.02 * _momentum(opt, p).abs().max())


def test_bitsandbytes_sgd8bit_trains_on_from_the_export():
    """Both optimizers step on from the same state with the same grads: bitsandbytes' 8-bit update (its
    own quantizer) stays within quantization error of torchsgd8's."""
    params = _params()
    opt = _trained(torchsgd8.SGD8bit, params)
    bnb_params = _copies(params)
    bnb_opt = bnb.optim.SGD8bit(bnb_params, lr=1.0, momentum=0.5, min_8bit_size=1000)
    bnb_opt.load_state_dict(torchsgd8.to_bitsandbytes_state_dict(opt.state_dict()))
    start = [p.detach().clone() for p in params]
    _continue([(opt, params), (bnb_opt, bnb_params)], steps=1)
    for p, q, p0 in zip(params, bnb_params, start):
        update = (p - p0).abs().max()
        assert update > 0
        torch.testing.assert_close(q, p, rtol=0, atol=0.02 * update.item())


def test_bitsandbytes_sgd32bit_trains_on_as_torchsgd8_does():
    params = _params()
    opt = _trained(torchsgd8.SGD32bit, params, weight_decay=0.01)
    bnb_params = _copies(params)
    bnb_opt = bnb.optim.SGD32bit(bnb_params, lr=1.0, momentum=0.5)
    bnb_opt.load_state_dict(torchsgd8.to_bitsandbytes_state_dict(opt.state_dict()))
    assert bnb_opt.param_groups[0]["weight_decay"] == 0.01
    for p, q in zip(params, bnb_params):
        assert torch.equal(bnb_opt.state[q]["state1"], opt.state[p]["momentum_buffer"])
    _continue([(opt, params), (bnb_opt, bnb_params)])
    for p, q in zip(params, bnb_params):
        torch.testing.assert_close(q, p)


def test_bitsandbytes_export_format_is_what_bitsandbytes_writes():
    """Same group keys, value types and state layout as bitsandbytes' own SGD8bit.state_dict()."""
    params = _params()
    ours = torchsgd8.to_bitsandbytes_state_dict(_trained(torchsgd8.SGD8bit, params).state_dict())
    bnb_params = _copies(params)
    theirs = _trained(bnb.optim.SGD8bit, bnb_params).state_dict()

    def layout(value):
        if isinstance(value, dict):
            return {k: layout(v) for k, v in value.items() if k != "params"}
        if isinstance(value, torch.Tensor):
            return (value.dtype, tuple(value.shape))
        if isinstance(value, (list, tuple)):
            return type(value)(layout(v) for v in value)
        return type(value)

    assert layout(ours) == layout(theirs)
    assert list(ours["state"][0]) == list(theirs["state"][0]) == ["step", BNB_WRAPPED_KEY]


@pytest.mark.parametrize("change, match", [
    (dict(nesterov=True), "nesterov=True"),
    (dict(maximize=True), "maximize=True"),
    (dict(dampening=0.1), "dampening 0.1"),
])
def test_bitsandbytes_export_refuses_what_bitsandbytes_does_not_compute(change, match):
    opt = _trained(torchsgd8.SGD8bit, _params())
    saved = opt.state_dict()
    saved["param_groups"][0].update(change)
    with pytest.raises(StateDictError, match=match):
        torchsgd8.to_bitsandbytes_state_dict(saved)


def test_bitsandbytes_export_refuses_complex_state():
    p = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    opt = _trained(torchsgd8.SGD32bit, [p])
    with pytest.raises(StateDictError, match="complex"):
        torchsgd8.to_bitsandbytes_state_dict(opt.state_dict())


@pytest.mark.parametrize("export", [torchsgd8.to_torch_state_dict, torchsgd8.to_bitsandbytes_state_dict])
def test_exports_take_only_torchsgd8_state_dicts(export):
    p = torch.nn.Parameter(torch.randn(3))
    torch_opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    torch_opt.step()
    with pytest.raises(StateDictError, match="not a torchsgd8 state dict"):
        export(torch_opt.state_dict())
    with pytest.raises(StateDictError, match="must be a dict"):
        export([1, 2])
    saved = _trained(torchsgd8.SGD8bit, _params()).state_dict()
    saved["state"][0]["extra"] = torch.zeros(1)
    with pytest.raises(StateDictError, match=r"param 0: not torchsgd8 state"):
        export(saved)
