"""Bad inputs at the optimizer level (not the raw ops): what is supported works like torch.optim.SGD, what is
not raises an exception of a stated type whose message names the problem, and a failed call changes
nothing: params, optimizer state and param groups are byte-identical before and after.

Covered: sparse grads and params; complex params (real views, as torch); params of different dtypes and
devices in one group; grads whose dtype or shape differ from the param's; a tensor listed twice; NaN, inf
and negative hyperparameters (as numbers and tensors, at construction and in add_param_group); nesterov
misuse; a 2-element lr tensor; state dicts with missing keys, wrong shapes/dtypes, wrong param or group
counts, an unknown format version, a bad codebook (qmap1) or absmax1, and malformed containers.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import torchsgd8
from torchsgd8._state import FORMAT_KEY, StateDictError

from helpers import assert_snapshot_unchanged, optimizer_snapshot, raw_bytes

# ---- helpers ----------------------------------------------------------------------------------------------


def fail_cleanly(opt, params, call, exc_type, match):
    """call() must raise exc_type matching `match` and leave params / state / groups as they were."""
    before = optimizer_snapshot(opt, params)
    with pytest.raises(exc_type, match=match):
        call()
    assert_snapshot_unchanged(before, optimizer_snapshot(opt, params))


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = ours.detach(), ref.detach()
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    a, b = a.double(), b.double()
    scale = max(b.abs().max().item(), 1e-30)
    return (a - b).abs().max().item() / scale


# ---- sparse ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, optim_bits=8,
                                                                                     min_8bit_size=1)],
                         ids=["no-momentum", "momentum", "8bit"])
def test_sparse_grad_raises_and_changes_nothing(kwargs):
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    opt = torchsgd8.SGD(emb.parameters(), lr=0.1, **kwargs)
    fail_cleanly(opt, [emb.weight], opt.step, RuntimeError, "sparse gradients are not supported")


@pytest.mark.parametrize("kwargs", [dict(momentum=0.9), dict(momentum=0.9, optim_bits=8, min_8bit_size=1)],
                         ids=["momentum", "8bit"])
def test_sparse_grad_after_a_dense_param_changes_nothing(kwargs):
    """The step fails on the second param; the first one's state must not be created by the failed step
    (else the next step would take it for a continuing buffer: buf = m * 0 + (1 - dampening) * g)."""
    dense = nn.Parameter(torch.randn(300, generator=seeded()))
    dense.grad = torch.randn(300, generator=seeded(1))
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    opt = torchsgd8.SGD([dense, emb.weight], lr=0.1, dampening=0.5, **kwargs)
    fail_cleanly(opt, [dense, emb.weight], opt.step, RuntimeError, "sparse gradients are not supported")


def test_sparse_param_rejected_at_construction():
    sparse = torch.randn(4, 4).to_sparse().requires_grad_()
    with pytest.raises(ValueError, match="sparse parameters are not supported"):
        torchsgd8.SGD([sparse], lr=0.1)
    opt = torchsgd8.SGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    fail_cleanly(opt, opt.param_groups[0]["params"], lambda: opt.add_param_group({"params": [sparse]}),
                 ValueError, "sparse parameters are not supported")


def test_integer_param_rejected():
    with pytest.raises(ValueError, match="floating-point or complex"):
        torchsgd8.SGD([torch.zeros(3, dtype=torch.int64)], lr=0.1)


# ---- complex params -------------------------------------------------------------------------------------

COMPLEX_CONFIGS = [
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.05),
    dict(momentum=0.8, nesterov=True, weight_decay=0.01, maximize=True),
    dict(momentum=0.0, weight_decay=0.1),
]


@pytest.mark.parametrize("config", COMPLEX_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("bits", [32, 8])
def test_complex64_params_match_torch(config, bits):
    gen = seeded(3)
    shapes = [(4, 3), (300,), (), (5, 7)]
    inits = [torch.randn(s, dtype=torch.complex64, generator=gen) for s in shapes]

    def leaf(i, x):
        if i == 3:  # a non-contiguous param
            t = torch.empty(7, 5, dtype=torch.complex64).t()
            t.copy_(x)
            return t.requires_grad_()
        return x.clone().requires_grad_()

    ours = [leaf(i, x) for i, x in enumerate(inits)]
    ref = [x.detach().clone().requires_grad_() for x in inits]
    opt = torchsgd8.SGD(ours, lr=0.1, optim_bits=bits, min_8bit_size=1, **config)
    ref_opt = torch.optim.SGD(ref, lr=0.1, **config)
    for _ in range(5):
        for p, r in zip(ours, ref):
            g = torch.randn(p.shape, dtype=torch.complex64, generator=gen)
            p.grad, r.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for i, (p, r) in enumerate(zip(ours, ref)):
        assert p.dtype == torch.complex64 and p.shape == r.shape
        assert max_rel_err(p, r) <= 1e-6, (i, max_rel_err(p, r))
        if config["momentum"]:
            # complex momentum is never quantized: torch's complex buffer, also with optim_bits=8
            assert set(opt.state[p]) == {"momentum_buffer"}
            buf = opt.state[p]["momentum_buffer"]
            assert buf.dtype == torch.complex64
            assert max_rel_err(buf, ref_opt.state[r]["momentum_buffer"]) <= 1e-6
    assert not ours[3].is_contiguous()  # updated in place, layout kept


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_compiled_step_with_complex_params_matches_eager(momentum):
    """torch.compile(opt.step) must handle complex params as eager does (they reach the op as real views)."""
    import torch._dynamo

    gen = seeded(6)
    init = torch.randn(4, 5, dtype=torch.complex64, generator=gen)
    grads = [torch.randn(4, 5, dtype=torch.complex64, generator=gen) for _ in range(3)]
    results = []
    torch._dynamo.reset()
    try:
        for compiled in (False, True):
            p = init.clone().requires_grad_()
            p.grad = torch.zeros_like(p)
            opt = torchsgd8.SGD([p], lr=0.1, momentum=momentum, weight_decay=0.01)
            step = torch.compile(opt.step, backend="aot_eager", fullgraph=True) if compiled else opt.step
            for g in grads:
                p.grad.copy_(g)
                step()
            results.append(p.detach().clone())
    finally:
        torch._dynamo.reset()
    assert torch.equal(results[1], results[0])


def test_complex_state_dict_loads_into_torch_and_back():
    gen = seeded(4)
    p = torch.randn(6, dtype=torch.complex64, generator=gen).requires_grad_()
    opt = torchsgd8.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(6, dtype=torch.complex64, generator=gen)
    opt.step()
    ref = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    ref.load_state_dict(opt.state_dict())
    assert torch.equal(ref.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    back = torchsgd8.SGD([p], lr=0.1, momentum=0.9)
    back.load_state_dict(ref.state_dict())
    assert torch.equal(back.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


# ---- mixed dtypes and devices in one group -------------------------------------------------------------

MIXED = [((300,), torch.float32), ((300,), torch.float64), ((300,), torch.bfloat16), ((300,), torch.float16),
         ((5, 6), torch.complex64), ((7,), torch.float32), ((), torch.float64)]


@pytest.mark.parametrize("bits", [32, 8])
def test_mixed_dtypes_in_one_group_equal_one_optimizer_per_param(bits):
    """Bucketing by dtype must not change numerics: one group holding every dtype gives bit for bit what
    separate optimizers give; fp32/fp64/complex64 also match torch.optim.SGD."""
    gen = seeded(5)
    inits = [torch.randn(s, generator=gen, dtype=d) for s, d in MIXED]
    together = [x.clone().requires_grad_() for x in inits]
    alone = [x.clone().requires_grad_() for x in inits]
    ref = [x.clone().requires_grad_() for x in inits]
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)
    opt = torchsgd8.SGD(together, optim_bits=bits, min_8bit_size=256, **hyper)
    singles = [torchsgd8.SGD([p], optim_bits=bits, min_8bit_size=256, **hyper) for p in alone]
    ref_opt = torch.optim.SGD(ref, **hyper)
    for _ in range(4):
        for ps in zip(together, alone, ref):
            g = torch.randn(ps[0].shape, generator=gen, dtype=ps[0].dtype)
            for p in ps:
                p.grad = g.clone()
        opt.step()
        for s in singles:
            s.step()
        ref_opt.step()
    for i, (a, b, r) in enumerate(zip(together, alone, ref)):
        assert a.dtype == inits[i].dtype
        assert torch.equal(a, b), f"param {i} ({a.dtype}) differs between one group and its own optimizer"
        assert set(opt.state[a]) == set(singles[i].state[b])
        for key, value in opt.state[a].items():
            assert torch.equal(value, singles[i].state[b][key]), (i, key)
        if bits == 32 and a.dtype in (torch.float32, torch.float64, torch.complex64):
            assert max_rel_err(a, r) <= 1e-6, (i, a.dtype)
    if bits == 8:
        kinds = ["8bit" if "state1" in opt.state[p] else "full" for p in together]
        assert kinds == ["8bit", "full", "8bit", "8bit", "full", "full", "full"]


@pytest.mark.parametrize("bits", [32, 8])
def test_cpu_and_meta_params_in_one_group_like_torch(bits):
    """Another device in the same group gets its own op call on that device; the CPU param's update is not
    affected (meta stands in for an accelerator: it has no data, only shapes)."""
    cpu = nn.Parameter(torch.ones(300))
    meta = nn.Parameter(torch.ones(300, device="meta"))
    ref = nn.Parameter(torch.ones(300))
    opt = torchsgd8.SGD([cpu, meta], lr=0.1, momentum=0.9, optim_bits=bits, min_8bit_size=1)
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9)
    for i in range(3):
        cpu.grad = torch.full((300,), float(i + 1))
        meta.grad = torch.ones(300, device="meta")
        ref.grad = torch.full((300,), float(i + 1))
        opt.step()
        ref_opt.step()
    assert meta.device.type == "meta" and meta.shape == (300,)
    for value in opt.state[meta].values():
        assert value.device.type in ("meta", "cpu")
    key = "state1" if bits == 8 else "momentum_buffer"
    assert opt.state[meta][key].device.type == "meta" and opt.state[meta][key].shape == (300,)
    if bits == 32:
        assert torch.equal(cpu, ref)
    else:
        assert max_rel_err(cpu, ref) <= 0.01


# ---- grads that do not fit their param -------------------------------------------------------------------

STEP_KINDS = {
    "no-momentum": dict(momentum=0.0),
    "momentum": dict(momentum=0.9, dampening=0.5),
    "8bit": dict(momentum=0.9, dampening=0.5, optim_bits=8, min_8bit_size=1),
}


def _param_with_bad_grad(bad_grad: torch.Tensor, shape=(5,)) -> nn.Parameter:
    p = nn.Parameter(torch.ones(shape))
    p.grad = torch.zeros(shape)
    p.grad.data = bad_grad  # what `p.grad = bad_grad` refuses; .data assignment gets it through
    return p


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.parametrize("bad, match", [
    (torch.ones(5, dtype=torch.float64), r"grad of param 0 in group 0 \(torch.float64, shape \(5,\).*must match its param \(torch.float32, shape \(5,\)"),
    (torch.ones(5, dtype=torch.bfloat16), r"grad of param 0 in group 0 \(torch.bfloat16, shape \(5,\).*must match its param \(torch.float32, shape \(5,\)"),
    (torch.ones(6), r"grad of param 0 in group 0 \(torch.float32, shape \(6,\).*must match its param \(torch.float32, shape \(5,\)"),
    (torch.ones(5, 1), r"grad of param 0 in group 0 \(torch.float32, shape \(5, 1\).*must match its param \(torch.float32, shape \(5,\)"),
], ids=["float64", "bfloat16", "longer", "extra-dim"])
def test_grad_that_does_not_fit_its_param_raises_and_changes_nothing(kind, bad, match):
    p = _param_with_bad_grad(bad)
    opt = torchsgd8.SGD([p], lr=0.1, **STEP_KINDS[kind])
    fail_cleanly(opt, [p], opt.step, RuntimeError, match)
    # and once the grad is fixed, the first step is a first step (buf = grad), as in torch
    p.grad = None
    p.grad = torch.ones(5)
    opt.step()
    ref = nn.Parameter(torch.ones(5))
    ref.grad = torch.ones(5)
    ref_opt = torch.optim.SGD([ref], lr=0.1, **{k: v for k, v in STEP_KINDS[kind].items()
                                                if k in ("momentum", "dampening")})
    ref_opt.step()
    assert torch.equal(p, ref), f"first good step after a failed one: {p.tolist()} != torch {ref.tolist()}"


def test_bad_grad_in_second_group_changes_nothing():
    """Validation must precede every update: the first group's params and state stay as they were."""
    good = nn.Parameter(torch.ones(300))
    good.grad = torch.ones(300)
    bad = _param_with_bad_grad(torch.ones(5, dtype=torch.float64))
    opt = torchsgd8.SGD([{"params": [good]}, {"params": [bad]}], lr=0.1, momentum=0.9)
    fail_cleanly(opt, [good, bad], opt.step, RuntimeError, "must match its param")


# ---- the same tensor twice ------------------------------------------------------------------------------


def test_same_tensor_in_two_groups_raises_like_torch():
    p = nn.Parameter(torch.ones(3))
    for cls in (torch.optim.SGD, torchsgd8.SGD):
        with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
            cls([{"params": [p]}, {"params": [p]}], lr=0.1)


@pytest.mark.parametrize("numel", [5, 70_000], ids=["small", "multi-thread"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_same_tensor_twice_in_a_group_behaves_like_torch(numel, momentum):
    """torch warns (a future error) and then applies the update once per occurrence, each occurrence of the
    first step starting its own buffer (the last one is kept). torchsgd8 must warn the same and then either
    do what torch does or refuse with a ValueError naming the duplicate."""
    results = {}
    for cls in (torch.optim.SGD, torchsgd8.SGD):
        p = nn.Parameter(torch.ones(numel))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                opt = cls([p, p], lr=0.1, momentum=momentum)
            except ValueError as e:
                assert cls is torchsgd8.SGD and "duplicate" in str(e)
                return
        assert any("duplicate parameters" in str(w.message) for w in caught), cls
        for _ in range(3):
            p.grad = torch.ones(numel)
            opt.step()
        results[cls] = (p.detach().clone(), [v.clone() for v in opt.state[p].values()])
    (p_ref, s_ref), (p_ours, s_ours) = results[torch.optim.SGD], results[torchsgd8.SGD]
    torch.testing.assert_close(p_ours, p_ref, rtol=1e-6, atol=0)
    for a, b in zip(s_ours, s_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


# ---- hyperparameters --------------------------------------------------------------------------------------

BAD_HYPER = [
    ("lr", float("inf"), ValueError, "Invalid learning rate value: inf"),
    ("lr", float("-inf"), ValueError, "Invalid learning rate value"),
    ("lr", torch.tensor(float("inf")), ValueError, "Invalid learning rate value: inf"),
    ("lr", torch.tensor(-0.5), ValueError, "Invalid learning rate value: -0.5"),
    ("lr", torch.tensor([0.1, 0.2]), ValueError, r"learning rate must be 1-element, got shape \(2,\)"),
    ("lr", torch.tensor(0.1, requires_grad=True), ValueError, "learning rate must not require grad"),
    ("lr", "0.1", TypeError, "learning rate must be a number, got str"),
    ("lr", None, TypeError, "learning rate must be a number, got NoneType"),
    ("momentum", float("nan"), ValueError, "Invalid momentum value: nan"),
    ("momentum", float("inf"), ValueError, "Invalid momentum value: inf"),
    ("momentum", -0.1, ValueError, "Invalid momentum value: -0.1"),
    ("momentum", torch.tensor(float("nan")), ValueError, "Invalid momentum value: nan"),
    ("momentum", torch.tensor([0.9, 0.9]), ValueError, r"momentum must be 1-element"),
    ("dampening", -1.0, ValueError, "Invalid dampening value: -1"),
    ("dampening", float("nan"), ValueError, "Invalid dampening value: nan"),
    ("dampening", float("inf"), ValueError, "Invalid dampening value: inf"),
    ("weight_decay", -1e-4, ValueError, "Invalid weight_decay value"),
    ("weight_decay", float("nan"), ValueError, "Invalid weight_decay value: nan"),
    ("weight_decay", float("inf"), ValueError, "Invalid weight_decay value: inf"),
    ("weight_decay", torch.tensor([0.1, 0.2]), ValueError, r"weight_decay must be 1-element, got shape \(2,\)"),
]


@pytest.mark.parametrize("name, value, exc, match", BAD_HYPER,
                         ids=[f"{n}={v!r}"[:40] for n, v, _, _ in BAD_HYPER])
def test_bad_hyperparameter_at_construction(name, value, exc, match):
    kwargs = dict(lr=0.1, momentum=0.9)
    kwargs[name] = value
    p = nn.Parameter(torch.ones(3))
    before = raw_bytes(p)
    with pytest.raises(exc, match=match):
        torchsgd8.SGD([p], **kwargs)
    assert raw_bytes(p) == before


ADD_GROUP_CASES = [BAD_HYPER[0], BAD_HYPER[4], BAD_HYPER[10], BAD_HYPER[19]]


@pytest.mark.parametrize("name, value, exc, match", ADD_GROUP_CASES,
                         ids=[f"{n}={v!r}"[:40] for n, v, _, _ in ADD_GROUP_CASES])
def test_bad_hyperparameter_in_add_param_group_leaves_the_optimizer_unchanged(name, value, exc, match):
    """A rejected group must not stay in the optimizer (it would be used by the next step)."""
    p = nn.Parameter(torch.ones(3))
    opt = torchsgd8.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(3)
    opt.step()
    q = nn.Parameter(torch.ones(3))
    fail_cleanly(opt, [p, q], lambda: opt.add_param_group({"params": [q], name: value}), exc, match)
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("kwargs", [
    dict(momentum=0.0, nesterov=True),
    dict(momentum=0.9, dampening=0.1, nesterov=True),
    dict(momentum=torch.tensor(0.0), nesterov=True),
    dict(nesterov=True),
], ids=["zero-momentum", "dampening", "zero-tensor-momentum", "default-momentum"])
def test_nesterov_misuse(kwargs):
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum and zero dampening"):
        torchsgd8.SGD([nn.Parameter(torch.ones(3))], lr=0.1, **kwargs)
    p = nn.Parameter(torch.ones(3))
    opt = torchsgd8.SGD([p], lr=0.1, momentum=0.9, nesterov=True)
    q = nn.Parameter(torch.ones(3))
    group = dict(kwargs, params=[q])
    group.setdefault("momentum", 0.0)
    fail_cleanly(opt, [p, q], lambda: opt.add_param_group(group), ValueError, "Nesterov momentum requires")


def test_nesterov_misuse_in_a_state_dict_is_rejected():
    p = nn.Parameter(torch.ones(3))
    opt = torchsgd8.SGD([p], lr=0.1, momentum=0.9)
    sd = opt.state_dict()
    sd["param_groups"][0].update(nesterov=True, dampening=0.5)
    fail_cleanly(opt, [p], lambda: opt.load_state_dict(sd), StateDictError, "Nesterov momentum requires")


def test_unsupported_bnb_args_raise_not_implemented():
    class Args:
        optim_bits = 8
        percentile_clipping = 5

    with pytest.raises(NotImplementedError, match="percentile_clipping"):
        torchsgd8.SGD([nn.Parameter(torch.ones(3))], lr=0.1, args=Args())


# ---- state dicts ------------------------------------------------------------------------------------------


def _trained(kind_of_step_values: int = 0):
    """Three params: a 300-element fp32 one (8-bit state), a 5-element fp32 one (momentum_buffer), a
    (2, 130) bf16 one (8-bit state); two param groups."""
    gen = seeded(10 + kind_of_step_values)
    w = nn.Parameter(torch.randn(300, generator=gen))
    b = nn.Parameter(torch.randn(5, generator=gen))
    c = nn.Parameter(torch.randn(2, 130, generator=gen).to(torch.bfloat16))
    params = [w, b, c]
    opt = torchsgd8.SGD([{"params": [w, b]}, {"params": [c], "lr": 0.05}], lr=0.1, momentum=0.9,
                        weight_decay=0.01, optim_bits=8, min_8bit_size=256)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    return opt, params


def _target_and_state_dict():
    source, params = _trained()
    sd = copy.deepcopy(source.state_dict())
    # a target with state of its own (other values), over the same params
    target = torchsgd8.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], lr=0.1, momentum=0.9,
                           weight_decay=0.01, optim_bits=8, min_8bit_size=256)
    gen = seeded(99)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    target.step()
    return target, params, sd


def test_unmodified_state_dict_loads():
    target, params, sd = _target_and_state_dict()
    target.load_state_dict(sd)
    assert torch.equal(target.state[params[0]]["state1"], sd["state"][0]["state1"])
    target.step()


def _set(path, value):
    def mutate(sd):
        node = sd
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return mutate


def _delete(path):
    def mutate(sd):
        node = sd
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


def _reverse_qmap(sd):
    sd["state"][0]["qmap1"] = sd["state"][0]["qmap1"].flip(0)


def _duplicate_qmap_entry(sd):
    q = sd["state"][0]["qmap1"].clone()
    q[200] = q[199]
    sd["state"][0]["qmap1"] = q


STATE_DICT_CASES = {
    # missing keys
    "no state": (_delete(["state"]), "must be a dict with 'state' and 'param_groups'"),
    "no param_groups": (_delete(["param_groups"]), "must be a dict with 'state' and 'param_groups'"),
    "group without lr": (_delete(["param_groups", 0, "lr"]), "param group 0 of the state dict has no 'lr'"),
    "group without momentum": (_delete(["param_groups", 1, "momentum"]), "param group 1 .*no 'momentum'"),
    "8-bit state without absmax1": (_delete(["state", 0, "absmax1"]), r"param 0 .*needs \['absmax1'\]"),
    "8-bit state without qmap1": (_delete(["state", 2, "qmap1"]), r"param 2 .*needs \['qmap1'\]"),
    "state without momentum keys": (_delete(["state", 0, "state1"]), "no 'momentum_buffer' or 'state1'"),
    # wrong shapes
    "momentum_buffer shape": (_set(["state", 1, "momentum_buffer"], torch.zeros(6)),
                              r"param 1 .*'momentum_buffer' has shape \(6,\), expected \(5,\)"),
    "state1 shape": (_set(["state", 2, "state1"], lambda t: t.reshape(-1)),
                     r"param 2 .*'state1' has shape \(260,\), expected \(2, 130\)"),
    "momentum_buffer 0-dim": (_set(["state", 1, "momentum_buffer"], torch.tensor(0.0)),
                              r"'momentum_buffer' has shape \(\), expected \(5,\)"),
    # wrong dtypes
    "absmax1 float64": (_set(["state", 0, "absmax1"], lambda t: t.double()),
                        "'absmax1' has dtype torch.float64, expected torch.float32"),
    "qmap1 float16": (_set(["state", 0, "qmap1"], lambda t: t.half()),
                      "'qmap1' has dtype torch.float16, expected torch.float32"),
    "momentum_buffer int64": (_set(["state", 1, "momentum_buffer"], torch.zeros(5, dtype=torch.int64)),
                              "'momentum_buffer' must be floating point"),
    "state1 int32": (_set(["state", 0, "state1"], lambda t: t.int()), "unexpected keys .* in 32-bit state"),
    "momentum_buffer a list": (_set(["state", 1, "momentum_buffer"], [0.0] * 5),
                               "'momentum_buffer' must be a tensor, got list"),
    # wrong param / group counts
    "extra param in group": (_set(["param_groups", 0, "params"], [0, 1, 7]),
                             "param group 0 has 2 params, the state dict's has 3"),
    "missing param in group": (_set(["param_groups", 1, "params"], []),
                               "param group 1 has 1 params, the state dict's has 0"),
    "one group too many": (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][1], params=[9])),
                           "state dict has 3 param groups, the optimizer has 2"),
    "one group too few": (lambda sd: sd["param_groups"].pop(), "state dict has 1 param groups, the optimizer has 2"),
    "state for unknown id": (_set(["state", 42], {"momentum_buffer": torch.zeros(5)}), r"unknown param ids \[42\]"),
    # format version
    "format version 3": (_set([FORMAT_KEY], 3), "format version 3; this torchsgd8 reads versions 1, 2"),
    "format version 0": (_set([FORMAT_KEY], 0), "format version 0"),
    "format version '1'": (_set([FORMAT_KEY], "1"), "format version '1'"),
    # codebook and absmax
    "qmap1 of 255": (_set(["state", 0, "qmap1"], lambda t: t[:255]), r"'qmap1' has shape \(255,\), expected \(256,\)"),
    "qmap1 of 512": (_set(["state", 0, "qmap1"], lambda t: torch.cat([t, t])), r"'qmap1' has shape \(512,\)"),
    "qmap1 reversed": (_reverse_qmap, "'qmap1' must be strictly increasing"),
    "qmap1 with a repeated entry": (_duplicate_qmap_entry, "'qmap1' must be strictly increasing"),
    "qmap1 with NaN": (_set(["state", 2, "qmap1"], lambda t: t.clone().index_fill_(0, torch.tensor([5]), float("nan"))),
                       "'qmap1' must be strictly increasing"),
    "absmax1 too short": (_set(["state", 0, "absmax1"], lambda t: t[:1]),
                          r"'absmax1' has shape \(1,\), expected \(2,\)"),
    "absmax1 too long": (_set(["state", 2, "absmax1"], lambda t: torch.cat([t, t])),
                         r"param 2 .*'absmax1' has shape \(4, 1\), expected \(2, 1\)"),
    "absmax1 2-D": (_set(["state", 0, "absmax1"], lambda t: t.reshape(1, 2)), r"'absmax1' has shape \(1, 2\)"),
    # garbage values
    "step negative": (_set(["state", 0, "step"], -3), "'step' must be a number >= 0"),
    "step string": (_set(["state", 0, "step"], "3"), "'step' must be a number >= 0"),
    "step 2 elements": (_set(["state", 0, "step"], torch.tensor([1.0, 2.0])), "'step' must hold one number"),
    "state not a dict": (_set(["state", 1], "buffer"), "state must be a dict, got str"),
    "lr None": (_set(["param_groups", 0, "lr"], None), "invalid param group: .*learning rate must be a number"),
    "lr NaN": (_set(["param_groups", 0, "lr"], float("nan")), "invalid param group: .*learning rate"),
    "lr 2-element tensor": (_set(["param_groups", 1, "lr"], torch.tensor([0.1, 0.2])),
                            r"invalid param group: .*learning rate must be 1-element, got shape \(2,\)"),
    "momentum negative": (_set(["param_groups", 0, "momentum"], -0.9), "invalid param group: .*momentum"),
    "betas not a pair": (lambda sd: (sd["param_groups"][0].pop("momentum"), sd["param_groups"][0].update(betas=[0.9])),
                         "'betas' must be a \\(momentum, dampening\\) pair"),
    "bnb wrapper not a dict": (_set(["state", 0], {"__bnb_optimizer_quant_state__": 3}),
                               "'__bnb_optimizer_quant_state__' must be a dict"),
    "key both wrapped and flat": (lambda sd: sd["state"][0].update(__bnb_optimizer_quant_state__={
        "state1": sd["state"][0]["state1"]}), "key 'state1' appears both wrapped and unwrapped"),
    "not a dict at all": (lambda sd: sd.clear(), "must be a dict with 'state' and 'param_groups'"),
    # malformed containers: every one must be a StateDictError naming the problem, not a Python error from
    # deep inside the loader (found by tests/test_fuzz.py)
    "param_groups None": (_set(["param_groups"], None), "param_groups"),
    "param_groups an int": (_set(["param_groups"], 3), "param_groups"),
    "param group not a dict": (_set(["param_groups", 0], 3), "param group 0"),
    "param group without params": (_delete(["param_groups", 0, "params"]), "param group 0.*'params'"),
    "params not a list": (_set(["param_groups", 0, "params"], None), "param group 0.*'params'"),
    "params ids unhashable": (_set(["param_groups", 0, "params"], [[0], 1]), "param group 0.*'params'"),
    "state None": (_set(["state"], None), "'state'"),
    "state a list": (_set(["state"], [0]), "'state'"),
    "state keys of mixed types": (_set(["state", 1], {"foo": 1, 5: 2}), r"param 1 .*keys"),
    "state tensor on meta": (_set(["state", 1, "momentum_buffer"], torch.zeros(5, device="meta")),
                             "param 1 .*momentum_buffer"),
    "sparse momentum_buffer": (_set(["state", 1, "momentum_buffer"], torch.zeros(5).to_sparse()),
                               "param 1 .*momentum_buffer"),
}


@pytest.mark.parametrize("case", STATE_DICT_CASES)
def test_bad_state_dict_raises_state_dict_error_and_changes_nothing(case):
    mutate, match = STATE_DICT_CASES[case]
    target, params, sd = _target_and_state_dict()
    if case == "not a dict at all":
        sd = [sd]
    else:
        mutate(sd)
    fail_cleanly(target, params, lambda: target.load_state_dict(sd), StateDictError, match)


@pytest.mark.parametrize("seed", [torch.tensor(1.5), torch.tensor([1, 2]), torch.tensor(3, dtype=torch.int32)],
                         ids=["float", "2-element", "int32"])
def test_bad_rounding_seed_in_state_dict_is_rejected_at_load(seed):
    """A stochastic-rounding optimizer must not accept a rounding_seed its kernels refuse: else the load
    succeeds and every later step raises."""
    p = nn.Parameter(torch.randn(300, generator=seeded()).to(torch.bfloat16))
    opt = torchsgd8.SGD([p], lr=0.1, momentum=0.9, stochastic_rounding=True)
    p.grad = torch.ones(300, dtype=torch.bfloat16)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["rounding_seed"] = seed
    fail_cleanly(opt, [p], lambda: opt.load_state_dict(sd), StateDictError, "rounding_seed")
    opt.step()  # still works


def test_state_dict_for_fewer_params_with_state_loads():
    """Dropping a param's state is not an error: that param restarts its momentum (first step: buf = grad)."""
    target, params, sd = _target_and_state_dict()
    del sd["state"][1]
    target.load_state_dict(sd)
    assert params[1] not in target.state or not target.state[params[1]]
    assert torch.equal(target.state[params[0]]["absmax1"], sd["state"][0]["absmax1"])
    target.step()
    assert set(target.state[params[1]]) == {"momentum_buffer"}
