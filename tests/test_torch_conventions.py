"""torchsgd8 behaves as torch.optim does: float hyperparameters under a schedule compile like tensor ones
(with the inductor and aot_eager backends, where dynamo's handling of floats matters), and the state-dict
protocol (hooks, param names, round trips, the GradScaler flag) is torch's."""
from __future__ import annotations

import copy
import inspect
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import torchsgd8

from helpers import assert_identical, raw_bytes, small_model, training_step




def _float_schedule(opt, name):
    """A scheduler that writes a new Python float into every group's lr (and, for OneCycleLR, momentum)
    at every step."""
    if name == "LambdaLR":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=120, cycle_momentum=True)


# ---- bug 1: float lr / momentum under a schedule --------------------------------------------------------

@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
@pytest.mark.parametrize("schedule", ["LambdaLR", "OneCycleLR"])
def test_float_hyperparameters_under_a_schedule_compile_the_step_at_most_twice(fresh_dynamo, backend, schedule):
    """torch.compile(opt.step, fullgraph=True) with float lr and momentum that a scheduler changes every
    step: 100 steps compile at most 2 frames (the first step creates the state), with eager's results."""

    def train(compiled):
        torch._dynamo.reset()
        model = small_model()
        opt = torchsgd8.SGD8bit(model.parameters(), lr=0.05, momentum=0.9, min_8bit_size=1000)
        sched = _float_schedule(opt, schedule)
        counter = CompileCounterWithBackend(backend)
        step = torch.compile(opt.step, backend=counter, fullgraph=True) if compiled else opt.step
        gen = torch.Generator().manual_seed(1)
        values = set()
        for _ in range(100):
            model(torch.randn(4, 16, generator=gen)).sum().backward()
            step()
            opt.zero_grad()
            sched.step()
            group = opt.param_groups[0]
            assert type(group["lr"]) is float and type(group["momentum"]) is float
            values.add((group["lr"], group["momentum"]))
        return [p.detach().clone() for p in model.parameters()], counter.frame_count, values

    compiled_params, frames, values = train(compiled=True)
    eager_params, _, _ = train(compiled=False)
    assert len(values) == 100, "the schedule should change the hyperparameters at every step"
    assert 1 <= frames <= 2
    for a, b in zip(compiled_params, eager_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_float_hyperparameters_under_a_schedule_compile_a_whole_training_step_at_most_twice(fresh_dynamo, backend):
    """Forward, autograd.grad and step as one fullgraph frame, float lr and momentum cycled by OneCycleLR:
    100 steps compile at most 2 frames, with eager's results (bitwise where the backend leaves the
    forward and backward to eager kernels; the update alone is bitwise with both, test above)."""

    def train(compiled):
        torch._dynamo.reset()
        model = small_model()
        opt = torchsgd8.SGD8bit(model.parameters(), lr=0.05, momentum=0.9, min_8bit_size=1000)
        sched = _float_schedule(opt, "OneCycleLR")
        step = training_step(model, opt, torch.nn.functional.mse_loss)
        counter = CompileCounterWithBackend(backend)
        run = torch.compile(step, backend=counter, fullgraph=True) if compiled else step
        gen = torch.Generator().manual_seed(1)
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            for _ in range(100):
                run(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen))
                sched.step()
        return [p.detach().clone() for p in model.parameters()], counter.frame_count

    compiled_params, frames = train(compiled=True)
    eager_params, _ = train(compiled=False)
    assert 1 <= frames <= 2
    for a, b in zip(compiled_params, eager_params):
        if backend == "inductor":  # its kernels for the forward and backward round differently from eager's
            torch.testing.assert_close(a, b)
        else:
            assert torch.equal(a, b)


def test_a_compiled_step_still_guards_on_momentum_being_zero(fresh_dynamo):
    """A float momentum stays symbolic in the compiled step, but whether it is 0 decides whether params
    use their state: set to 0, the compiled step updates as eager's does, leaving the 8-bit state (its
    step count included) alone."""
    start = torch.randn(2000)
    runs = []
    for compiled in (True, False):
        p = torch.nn.Parameter(start.clone())
        opt = torchsgd8.SGD8bit([p], lr=0.1, momentum=0.9, min_8bit_size=1000)
        step = torch.compile(opt.step, backend="aot_eager", fullgraph=True) if compiled else opt.step
        gen = torch.Generator().manual_seed(0)
        for momentum in (0.9, 0.8, 0.7, 0.0, 0.0):
            opt.param_groups[0]["momentum"] = momentum
            p.grad = torch.randn(2000, generator=gen)
            step()
        runs.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    (compiled_param, compiled_state), (eager_param, eager_state) = runs
    assert eager_state["step"].item() == 3
    assert torch.equal(compiled_param, eager_param)
    assert compiled_state.keys() == eager_state.keys()
    for key, value in eager_state.items():
        assert torch.equal(compiled_state[key], value), key


# ---- bugs 2-5: the state-dict protocol -------------------------------------------------------------------

def _trained(opt_class=torchsgd8.SGD8bit, named=False, steps=2, **kwargs):
    """An optimizer over a fresh small_model() after `steps` steps (fp32 and 8-bit state), and the model."""
    model = small_model()
    params = model.named_parameters() if named else model.parameters()
    kwargs = {"lr": 0.05, "momentum": 0.9, "min_8bit_size": 1000, **kwargs}
    opt = opt_class(params, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(4, 16, generator=gen)).sum().backward()
        opt.step()
        opt.zero_grad()
    return opt, model


def test_load_state_dict_runs_the_load_state_dict_hooks():
    """Bug 2: register_load_state_dict_pre_hook / _post_hook hooks run, in torch's order and with its
    arguments; a pre-hook gets a shallow copy it may edit, and what it returns is what loads."""
    opt, _ = _trained()
    saved = opt.state_dict()
    other, _ = _trained(steps=3)
    replacement = other.state_dict()
    calls = []

    def first_pre_hook(optimizer, state_dict):
        calls.append(("pre", optimizer is opt, state_dict is not saved and state_dict == saved))
        state_dict["marker"] = True  # a shallow copy: the caller's dict is not touched
        return replacement

    def second_pre_hook(optimizer, state_dict):
        calls.append(("pre2", state_dict is replacement))

    opt.register_load_state_dict_pre_hook(second_pre_hook)
    opt.register_load_state_dict_pre_hook(first_pre_hook, prepend=True)
    handle = opt.register_load_state_dict_post_hook(lambda optimizer: calls.append(("post", optimizer is opt)))
    opt.load_state_dict(saved)
    assert calls == [("pre", True, True), ("pre2", True), ("post", True)]
    assert "marker" not in saved
    assert_identical(opt.state_dict(), replacement)  # the pre-hook's state dict is what loaded
    handle.remove()
    opt.load_state_dict(saved)
    assert len(calls) == 5 and calls[-1][0] == "pre2"


def test_state_dict_runs_the_state_dict_hooks_on_the_finished_state_dict():
    """register_state_dict_pre_hook / _post_hook: the post-hook sees the state dict as returned (format
    version included), and a state dict it returns is returned as it is."""
    opt, _ = _trained()
    seen = []
    opt.register_state_dict_pre_hook(lambda optimizer: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda optimizer, sd: seen.append(sorted(sd)))
    opt.register_state_dict_post_hook(lambda optimizer, sd: {"replaced": True})
    assert opt.state_dict() == {"replaced": True}
    assert seen == ["pre", ["param_groups", "state", "torchsgd8_format_version"]]


def test_load_state_dict_keeps_param_names():
    """Bug 3: param names from named_parameters() survive load_state_dict (saved names win, as in
    torch), and are saved again."""
    opt, model = _trained(named=True)
    names = [name for name, _ in model.named_parameters()]
    assert opt.param_groups[0]["param_names"] == names
    saved = opt.state_dict()
    assert saved["param_groups"][0]["param_names"] == names
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["param_names"] == names
    assert opt.state_dict()["param_groups"][0]["param_names"] == names
    # a state dict without names keeps the optimizer's; saved names replace them
    unnamed, _ = _trained()
    opt.load_state_dict(unnamed.state_dict())
    assert opt.param_groups[0]["param_names"] == names
    renamed = opt.state_dict()
    renamed["param_groups"][0]["param_names"] = [f"p{i}" for i in range(len(names))]
    opt.load_state_dict(renamed)
    assert opt.param_groups[0]["param_names"] == [f"p{i}" for i in range(len(names))]


@pytest.mark.parametrize("opt_class", [torchsgd8.SGD8bit, torchsgd8.SGD32bit])
@pytest.mark.parametrize("case", ["plain", "named", "tensor lr", "stochastic rounding", "two groups"])
def test_a_state_dict_round_trip_changes_nothing(opt_class, case):
    """Bug 4: state_dict() is identical before and after load_state_dict(state_dict()) (same keys in the
    same order, same values and types), and equal for optimizers over equal params with equal histories."""
    kwargs = {"tensor lr": {"lr": torch.tensor(0.05)}, "stochastic rounding": {"stochastic_rounding": True}}

    def make():
        torch.manual_seed(5)  # the rounding seed is drawn from torch's default generator
        opt, model = _trained(opt_class, named=case == "named", **kwargs.get(case, {}))
        if case == "two groups":
            extra = torch.nn.Parameter(torch.randn(3))
            opt.add_param_group({"params": [extra], "lr": 0.5, "weight_decay": 0.1})
        return opt

    opt = make()
    before = opt.state_dict()
    assert_identical(before, make().state_dict())
    opt.load_state_dict(before)
    assert_identical(opt.state_dict(), before)
    opt.load_state_dict(opt.state_dict())
    assert_identical(opt.state_dict(), before)
    assert all("differentiable" not in group for group in opt.param_groups)


@pytest.mark.parametrize("opt_class", [torch.optim.SGD, torchsgd8.SGD32bit], ids=lambda c: c.__name__)
def test_a_shared_tensor_lr_stays_shared_after_loading(opt_class):
    """Groups that don't set their own lr share the default tensor lr, so a per-group schedule's last
    write wins for all of them (README); a loaded state dict keeps that sharing. As torch's optimizers."""
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(2)]
    opt = opt_class([{"params": params[:1]}, {"params": params[1:]}], lr=torch.tensor(0.1), momentum=0.9)
    assert opt.param_groups[0]["lr"] is opt.param_groups[1]["lr"]
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups[0]["lr"] is opt.param_groups[1]["lr"]
    torch.optim.lr_scheduler.LambdaLR(opt, [lambda epoch: 1.0, lambda epoch: 0.5])
    assert [float(group["lr"]) for group in opt.param_groups] == [float(torch.tensor(0.05))] * 2


def test_load_state_dict_keeps_a_user_choice_of_amp_scaling():
    """Bug 5: a user who set _step_supports_amp_scaling = False (Lightning requires it to clip gradients
    under AMP) keeps it after load_state_dict."""
    opt, _ = _trained()
    assert opt._step_supports_amp_scaling is True
    opt._step_supports_amp_scaling = False
    opt.load_state_dict(opt.state_dict())
    assert opt._step_supports_amp_scaling is False


# ---- drop-in for torch.optim.SGD users ------------------------------------------------------------------

OUR_CLASSES = [torchsgd8.SGD, torchsgd8.SGD8bit, torchsgd8.SGD32bit]


@pytest.mark.parametrize("opt_class", OUR_CLASSES, ids=lambda c: c.__name__)
def test_every_torch_sgd_argument_is_accepted_with_torchs_default(opt_class):
    """Each argument of torch.optim.SGD's constructor is ours too, of the same kind (positional or
    keyword-only) and with the same default: lr=1e-3, foreach=None, fused=None, differentiable=False..."""
    ours = inspect.signature(opt_class.__init__).parameters
    for name, theirs in inspect.signature(torch.optim.SGD.__init__).parameters.items():
        assert name in ours, name
        assert (ours[name].kind, ours[name].default) == (theirs.kind, theirs.default), name
    p = torch.nn.Parameter(torch.randn(3))
    assert opt_class([p]).defaults["lr"] == torch.optim.SGD([p]).defaults["lr"] == 1e-3


@pytest.mark.parametrize("opt_class", OUR_CLASSES, ids=lambda c: c.__name__)
def test_docstrings_describe_every_argument(opt_class):
    doc = inspect.getdoc(opt_class)
    args = doc[doc.index("Args:"):]
    for name in list(inspect.signature(opt_class.__init__).parameters)[1:]:
        assert re.search(rf"^\s+(\w+, )*{name}(, \w+)*:", args, re.MULTILINE), f"{opt_class.__name__}: {name}"


@pytest.mark.parametrize("flags", [dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False),
                                   dict(foreach=None, fused=None, differentiable=False)], ids=str)
def test_foreach_and_fused_are_accepted_and_change_nothing(flags):
    results = []
    for kwargs in ({}, flags):
        p = torch.nn.Parameter(torch.arange(6.0))
        opt = torchsgd8.SGD32bit([p], lr=0.1, momentum=0.9, **kwargs)
        for step in range(3):
            p.grad = torch.full((6,), float(step + 1))
            opt.step()
        results.append((p.detach().clone(), opt.state_dict()))
    assert torch.equal(results[0][0], results[1][0])
    assert_identical(results[0][1], results[1][1])


def test_differentiable_true_is_not_implemented():
    with pytest.raises(NotImplementedError, match="differentiable=True is not supported"):
        torchsgd8.SGD8bit([torch.nn.Parameter(torch.randn(3))], lr=0.1, differentiable=True)


@pytest.mark.parametrize("name, value", [
    ("lr", np.float32(0.25)), ("lr", np.float64(0.25)), ("lr", torch.tensor(0.25)), ("lr", torch.tensor([0.25])),
    ("weight_decay", np.float32(0.125)), ("weight_decay", torch.tensor(0.125)), ("weight_decay", np.int64(1)),
    ("momentum", np.float32(0.5)), ("dampening", np.float64(0.5)),
], ids=lambda v: type(v).__name__ if not isinstance(v, str) else v)
def test_numpy_scalars_and_one_element_tensors_as_torch_accepts_them(name, value):
    """A numpy scalar or a 1-element tensor hyperparameter updates as its float does, and as
    torch.optim.SGD with the same value (values exact in binary, so the results are bitwise equal)."""
    float_value = float(value)
    results = []
    for opt_class, v in ((torchsgd8.SGD32bit, value), (torchsgd8.SGD32bit, float_value), (torch.optim.SGD, value)):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 8))
        kwargs = {"lr": 0.5, "momentum": 0.75, name: v}
        opt = opt_class([p], **kwargs)
        assert opt.param_groups[0][name] is v  # kept as given, as torch keeps it
        for step in range(3):
            p.grad = torch.linspace(0, 1, 8) * (step + 1)
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(results[0], results[1])
    assert torch.equal(results[0], results[2])


# ---- the same scenarios with torch.optim.SGD and torchsgd8.SGD32bit ---------------------------------------

BOTH = [torch.optim.SGD, torchsgd8.SGD32bit]


def _same_behaviour(scenario):
    """scenario(opt_class) for torch.optim.SGD and SGD32bit: what each observed, which must be equal."""
    theirs, ours = (scenario(opt_class) for opt_class in BOTH)
    assert ours == theirs
    return ours


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _backward(model, seed=0):
    model(torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))).sum().backward()


def _values(tensors):
    return [raw_bytes(t) for t in tensors]


def test_hooks_run_as_torchs():
    """Step hooks (per optimizer and global, a pre-hook replacing the arguments), state-dict and
    load-state-dict hooks (a post-hook replacing the state dict): the same calls in the same order."""

    def scenario(opt_class):
        model = _net()
        opt = opt_class(model.parameters(), lr=0.1, momentum=0.9)
        calls = []
        handles = [
            opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt, args == (opt,), kwargs))),
            opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": lambda: 7.0})),
            opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", args == (opt,), sorted(kwargs)))),
            register_optimizer_step_pre_hook(lambda o, args, kwargs: calls.append(("global pre", o is opt))),
            register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append(("global post", o is opt))),
            opt.register_state_dict_pre_hook(lambda o: calls.append(("sd pre", o is opt))),
            opt.register_state_dict_post_hook(lambda o, sd: calls.append(("sd post", sorted(sd["param_groups"][0]) >= ["lr"]))),
            opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1}),
            opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("load pre", sd.get("extra")))),
            opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"}),
            opt.register_load_state_dict_post_hook(lambda o: calls.append(("load post", o is opt))),
        ]
        try:
            _backward(model)
            loss = opt.step()
            calls.append(("loss", loss))
            saved = opt.state_dict()
            calls.append(("saved extra", saved.get("extra")))
            opt.load_state_dict(saved)
        finally:
            for handle in handles:
                handle.remove()
        opt.step()
        opt.state_dict()
        return calls

    calls = _same_behaviour(scenario)
    assert ("loss", 7.0) in calls and ("load post", True) in calls


def test_named_params_as_torchs():
    def scenario(opt_class):
        model = _net()
        named = list(model.named_parameters())
        opt = opt_class(named[:2], lr=0.1, momentum=0.9)
        opt.add_param_group({"params": named[2:], "lr": 0.2})
        _backward(model)
        opt.step()
        saved = opt.state_dict()
        opt.load_state_dict(saved)
        seen = [g["param_names"] for g in opt.param_groups], [g["param_names"] for g in saved["param_groups"]]
        with pytest.raises(ValueError) as mixed:
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
        return seen, str(mixed.value)

    _same_behaviour(scenario)


def test_state_dict_round_trips_as_torchs():
    """Both: identical state dicts after load_state_dict(state_dict()), with the same values under the
    keys they share."""

    def scenario(opt_class):
        model = _net()
        opt = opt_class(model.parameters(), lr=torch.tensor(0.1), momentum=0.9, weight_decay=0.01)
        _backward(model)
        opt.step()
        before = opt.state_dict()
        opt.load_state_dict(before)
        assert_identical(opt.state_dict(), before)
        state = {i: {k: raw_bytes(v) for k, v in s.items()} for i, s in before["state"].items()}
        common = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "params"}
        groups = [{k: (raw_bytes(v) if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k in common}
                  for g in before["param_groups"]]
        return state, groups

    _same_behaviour(scenario)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_as_torchs(how):
    """A deep copy or pickle round trip of the model and optimizer together: the copy trains on from the
    same state, apart from the original, with the results of torch's copies."""

    def scenario(opt_class):
        model = _net()
        opt = opt_class(model.parameters(), lr=0.1, momentum=0.9)
        _backward(model)
        opt.step()
        model2, opt2 = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
        assert type(opt2) is opt_class and opt2.param_groups[0]["params"][0] is next(model2.parameters())
        assert_identical(opt2.state_dict(), opt.state_dict())
        before = _values(model.parameters())
        for _ in range(2):
            opt2.zero_grad()
            _backward(model2, seed=1)
            opt2.step()
        assert _values(model.parameters()) == before
        return _values(model2.parameters()), repr(opt2) == repr(opt)

    _same_behaviour(scenario)


def test_repr_as_torchs():
    """``Class (\\nParameter Group i\\n    key: value ...)``: torch's layout, the same lines for the keys
    both have."""

    def scenario(opt_class):
        model = _net()
        opt = opt_class([{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}],
                        lr=0.1, momentum=0.9)
        lines = repr(opt).splitlines()
        assert lines[0] == f"{opt_class.__name__} (" and lines[-1] == ")"
        shared = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
        return [line for line in lines[1:-1] if line.startswith("Parameter Group") or line.split(":")[0].strip() in shared]

    _same_behaviour(scenario)


def test_zero_grad_and_steps_without_grads_as_torchs():
    """A step with no grads changes nothing and creates no state; zero_grad() sets grads to None,
    zero_grad(set_to_none=False) zeroes them, and a step on zero grads updates as torch's does."""

    def scenario(opt_class):
        model = _net()
        opt = opt_class(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        before = _values(model.parameters())
        opt.step()
        seen = [_values(model.parameters()) == before, len(opt.state)]
        _backward(model)
        opt.step()
        opt.zero_grad()
        seen.append([p.grad for p in model.parameters()])
        _backward(model)
        opt.zero_grad(set_to_none=False)
        seen.append([raw_bytes(p.grad) == raw_bytes(torch.zeros_like(p)) for p in model.parameters()])
        opt.step()
        return seen + [_values(model.parameters())]

    _same_behaviour(scenario)


def test_params_without_grads_as_torchs():
    """Params without a grad (frozen, or not in the loss) are not updated and get no state."""

    def scenario(opt_class):
        model = _net()
        model[0].bias.requires_grad_(False)
        params = list(model.parameters()) + [torch.nn.Parameter(torch.ones(4))]  # the last is in no loss
        opt = opt_class(params, lr=0.1, momentum=0.9)
        before = _values(params)
        for step in range(2):
            _backward(model, seed=step)
            opt.step()
        after = _values(params)
        with_state = sorted(i for i, p in enumerate(params) if p in opt.state)
        return [a == b for a, b in zip(after, before)], with_state, after

    unchanged, with_state, _ = _same_behaviour(scenario)
    assert unchanged == [False, True, False, False, True] and with_state == [0, 2, 3]


def _param():
    return torch.nn.Parameter(torch.randn(3))


ERROR_CASES = {
    "params is a tensor": lambda c: c(torch.randn(3, requires_grad=True)),
    "no params": lambda c: c([]),
    "a param is not a tensor": lambda c: c([1.0]),
    "a non-leaf param": lambda c: c([torch.randn(3, requires_grad=True) * 2]),
    "params in a set": lambda c: c([{"params": {_param()}}]),
    "a param in two groups": lambda c: (lambda p: c([{"params": [p]}, {"params": [p]}]))(_param()),
    "some params named": lambda c: c([("a", _param()), _param()]),
    "negative lr": lambda c: c([_param()], lr=-0.1),
    "2-element tensor lr": lambda c: c([_param()], lr=torch.tensor([0.1, 0.2])),
    "lr a string": lambda c: c([_param()], lr="0.1"),
    "lr None": lambda c: c([_param()], lr=None),
    "negative momentum": lambda c: c([_param()], momentum=-0.5),
    "momentum a string": lambda c: c([_param()], momentum="0.9"),
    "negative weight_decay": lambda c: c([_param()], weight_decay=-0.1),
    "nesterov without momentum": lambda c: c([_param()], nesterov=True),
    "nesterov with dampening": lambda c: c([_param()], momentum=0.9, dampening=0.1, nesterov=True),
    "fused and foreach": lambda c: c([_param()], fused=True, foreach=True),
    "fused and differentiable": lambda c: c([_param()], fused=True, differentiable=True),
    "add_param_group of a list": lambda c: c([_param()]).add_param_group([_param()]),
    "add_param_group of a present param": lambda c: (lambda p: c([p]).add_param_group({"params": [p]}))(_param()),
    "add_param_group named into unnamed": lambda c: c([_param()]).add_param_group({"params": [("a", _param())]}),
    "load_state_dict with another group count": lambda c: c([_param()]).load_state_dict(
        c([{"params": [_param()]}, {"params": [_param()]}]).state_dict()),
    "load_state_dict with another group size": lambda c: c([_param()]).load_state_dict(c([_param(), _param()]).state_dict()),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_as_torchs(case):
    """Each input torch.optim.SGD rejects, SGD32bit rejects with the same exception type (or a subclass:
    StateDictError is a ValueError), so an `except` written for torch catches it."""
    errors = []
    for opt_class in BOTH:
        with pytest.raises(Exception) as info:
            ERROR_CASES[case](opt_class)
        errors.append(info.type)
    assert issubclass(errors[1], errors[0])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nesterov", [False, True])
def test_complex_and_half_precision_params_as_torchs(dtype, nesterov):
    """Not bitwise (README): torchsgd8 computes bf16/fp16 updates in fp32 and rounds once, torch rounds
    after each operation; complex updates use fused multiply-adds per real and imaginary part, torch's
    complex products round each product. Per step, from the same params and buffers, params and buffers
    differ from torch's by at most about 2 roundings: 2 eps of the dtype times the size of the operands."""
    lr, momentum, weight_decay = 0.01, 0.9, 0.01
    eps = torch.finfo(dtype).eps
    real = torch.view_as_real if dtype.is_complex else (lambda t: t)
    start = torch.randn(20_000, generator=torch.Generator().manual_seed(0)).to(dtype)
    if dtype.is_complex:
        start = start + 1j * torch.randn(20_000, generator=torch.Generator().manual_seed(1)).to(dtype)
    params = [torch.nn.Parameter(start.clone()) for _ in BOTH]
    opts = [c([p], lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov) for c, p in zip(BOTH, params)]
    gen = torch.Generator().manual_seed(2)
    for step in range(5):
        grad = torch.randn(start.shape, generator=gen).to(dtype)
        with torch.no_grad():  # both start each step from SGD32bit's params and buffer
            params[0].copy_(params[1])
            if step:
                opts[0].state[params[0]]["momentum_buffer"].copy_(opts[1].state[params[1]]["momentum_buffer"])
        p_old = real(params[1].detach()).double().abs()
        buf_old = real(opts[1].state[params[1]]["momentum_buffer"]).double().abs() if step else 0
        for p, opt in zip(params, opts):
            p.grad = grad.clone()
            opt.step()
        d = real(grad).double().abs() + weight_decay * p_old
        buf_scale = momentum * buf_old + d
        p_scale = p_old + lr * (d + momentum * buf_scale if nesterov else buf_scale)
        theirs, ours = (real(p.detach()).double() for p in params)
        their_buf, our_buf = (real(opt.state[p]["momentum_buffer"]).double() for opt, p in zip(opts, params))
        assert ((ours - theirs).abs() <= 2 * eps * p_scale).all()
        assert ((our_buf - their_buf).abs() <= 2 * eps * buf_scale).all()


def _sparse_grad_step(opt_class):
    p = torch.nn.Parameter(torch.randn(4, 2))
    opt = opt_class([p], lr=0.1)
    p.grad = torch.randn(4, 2).to_sparse()
    opt.step()


def _load_negative_lr(opt_class):
    opt = opt_class([_param()], lr=0.1)
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = -1.0
    opt.load_state_dict(saved)


STRICTER_CASES = {  # README, "Stricter than torch.optim.SGD"
    "a param twice in a group": (lambda c: (lambda p: c([p, p], lr=0.1))(_param()), ValueError),
    "a sparse grad": (_sparse_grad_step, RuntimeError),
    "a sparse param": (lambda c: c([torch.randn(3, 3).to_sparse().requires_grad_()], lr=0.1), ValueError),
    "an integer param": (lambda c: c([torch.zeros(3, dtype=torch.long)], lr=0.1), ValueError),
    "NaN lr": (lambda c: c([_param()], lr=float("nan")), ValueError),
    "infinite momentum": (lambda c: c([_param()], momentum=float("inf")), ValueError),
    "infinite weight_decay": (lambda c: c([_param()], weight_decay=float("inf")), ValueError),
    "negative dampening": (lambda c: c([_param()], dampening=-1.0), ValueError),
    "lr requiring grad": (lambda c: c([_param()], lr=torch.tensor(0.1, requires_grad=True)), ValueError),
    "negative lr in add_param_group": (lambda c: c([_param()]).add_param_group({"params": [_param()], "lr": -1.0}),
                                       ValueError),
    "negative lr in load_state_dict": (_load_negative_lr, ValueError),
    "differentiable": (lambda c: c([_param()], differentiable=True), NotImplementedError),
}


@pytest.mark.parametrize("case", list(STRICTER_CASES))
def test_deliberately_stricter_than_torch(case):
    """Inputs torch.optim.SGD accepts and torchsgd8 rejects on purpose, each listed in the README."""
    make, error = STRICTER_CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optimizer.add_param_group warns about the duplicate param
        make(torch.optim.SGD)
        with pytest.raises(error):
            make(torchsgd8.SGD32bit)
