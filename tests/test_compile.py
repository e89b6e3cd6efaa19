"""torch.compile of torchsgd8's optimizers.

What is checked:
  * ``torch.compile(opt.step, fullgraph=True)`` traces the whole step as one graph (no graph break), with
    fp32 and 8-bit state, alongside a compiled model, under ``aot_eager`` and ``inductor``; the result is
    the result of the eager step (the same kernels run, so bit for bit when the gradients are the same).
  * A tensor lr driven by an LR scheduler does not recompile the compiled step.
  * torch.optim.SGD's own step graph-breaks under ``fullgraph=True`` (why ours matters).
  * forward + ``torch.autograd.grad`` + step compile as one graph (``trace_autograd_ops``).

Each test starts and ends with ``torch._dynamo.reset()``. Models are tiny and step counts small: compile
time dominates.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch._dynamo.utils import counters

import torchsgd8
from torchsgd8.quantization import signed_dynamic_map

from helpers import training_step

BACKENDS = ["aot_eager", "inductor"]

# min_8bit_size=64: both weights (512 and 256 elements) and the 64-element bias get 8-bit state, the
# 4-element bias keeps a full-precision buffer, so an 8-bit step runs both kernels.
KINDS = {
    "fp32": (torchsgd8.SGD32bit, {}),
    "8bit": (torchsgd8.SGD8bit, dict(min_8bit_size=64)),
}
HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True)
STEPS = 6


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))


def make_data(steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(steps, 32, 8, generator=g)
    w = torch.randn(8, 4, generator=g)
    return x, x @ w + 0.1 * torch.randn(steps, 32, 4, generator=g)


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def assert_params_equal(model_a, model_b, atol=0.0):
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        if atol == 0.0:
            assert torch.equal(a, b), f"{name}: max diff {(a - b).abs().max().item()}"
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_state_equal(opt_a, model_a, opt_b, model_b, skip=()):
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            if key in skip:
                continue
            assert torch.equal(sa[key], sb[key]), f"{name}.{key}: {sa[key]} != {sb[key]}"


def make_opt(kind, params, **hyper):
    cls, extra = KINDS[kind]
    return cls(params, **{**HYPER, **hyper}, **extra)


def kinds_of_state(opt, model) -> set[str]:
    return {"8bit" if "state1" in opt.state[p] else "fp32" for p in model.parameters()}


# ---- the step alone ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_step_traces_as_one_graph_with_the_op(kind):
    model = make_model()
    x, y = make_data(1)
    F.mse_loss(model(x[0]), y[0]).backward()
    opt = make_opt(kind, model.parameters())
    op = "torchsgd8.sgd8bit_update_.default" if kind == "8bit" else "torchsgd8.sgd_update_.default"
    for _ in range(2):  # first step (creates state), then a steady-state step
        explanation = torch._dynamo.explain(opt.step)()
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        ops = [str(o) for o in explanation.ops_per_graph[0]]
        assert op in ops, ops
    assert kinds_of_state(opt, model) == ({"fp32", "8bit"} if kind == "8bit" else {"fp32"})


def train(backend, kind, *, compile_model, compile_step, steps=STEPS):
    model = make_model()
    opt = make_opt(kind, model.parameters())
    forward = torch.compile(model, backend=backend) if compile_model else model
    step_counter = CompileCounterWithBackend(backend) if compile_step else None
    step = torch.compile(opt.step, backend=step_counter, fullgraph=True) if compile_step else opt.step
    x, y = make_data(steps)
    losses = []
    for i in range(steps):
        opt.zero_grad()  # set_to_none: every step gets new grad tensors, as in a normal loop
        loss = F.mse_loss(forward(x[i]), y[i])
        loss.backward()
        step()
        losses.append(loss.item())
    return model, opt, losses, step_counter


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_in_compiled_training_matches_eager(backend, kind):
    model, opt, losses, step_counter = train(backend, kind, compile_model=True, compile_step=True)
    assert graph_breaks() == 0, dict(counters["graph_break"])
    assert losses[-1] < losses[0]
    assert kinds_of_state(opt, model) == ({"fp32", "8bit"} if kind == "8bit" else {"fp32"})

    # Same compiled model, eager step: the gradients are the same, so params and state must be
    # bit-identical (the step runs the same kernels either way). qmap1 has its own test below.
    ref_model, ref_opt, ref_losses, _ = train(backend, kind, compile_model=True, compile_step=False)
    assert losses == ref_losses
    assert_params_equal(model, ref_model)
    assert_state_equal(opt, model, ref_opt, ref_model, skip=("qmap1",))

    # Fully eager: inductor's forward/backward round differently (~1e-8), so fp32 is compared to a
    # tolerance; with aot_eager nothing is rewritten and everything is bitwise.
    eager_model, eager_opt, _, _ = train(None, kind, compile_model=False, compile_step=False)
    if backend == "aot_eager":
        assert_params_equal(model, eager_model)
        assert_state_equal(opt, model, eager_opt, eager_model)
    elif kind == "fp32":
        assert_params_equal(model, eager_model, atol=1e-6)

    # the first step (creates state) and the steady state; no recompilation on later steps
    assert step_counter.frame_count <= 2, step_counter.frame_count


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_first_step_stores_the_exact_codebook(backend):
    """The 8-bit state created inside a compiled first step must carry bitsandbytes' codebook bit for bit
    (``qmap1`` goes into state dicts and decides how they are loaded), as the eager first step does."""
    model = make_model()
    x, y = make_data(2)
    opt = make_opt("8bit", model.parameters())
    step = torch.compile(opt.step, backend=backend, fullgraph=True)
    for i in range(2):
        opt.zero_grad()
        F.mse_loss(model(x[i]), y[i]).backward()
        step()
    expected = signed_dynamic_map()
    qmaps = [opt.state[p]["qmap1"] for p in model.parameters() if "qmap1" in opt.state[p]]
    assert len(qmaps) == 3
    for qmap in qmaps:
        mismatched = (qmap != expected).nonzero().flatten().tolist()
        assert mismatched == [], f"qmap1 differs from signed_dynamic_map() at {mismatched}"


# ---- LR schedules with a tensor lr ----------------------------------------------------------------------

SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5),
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1.0 + epoch)),
}
SCHEDULE_STEPS = 24


def scheduled_training(kind, scheduler, how, cnt=None, extra=None):
    """Trains with a tensor lr that `scheduler` updates every step.

    how: "eager" (opt.step), "bound" (torch.compile(opt.step) taken before the scheduler replaces
    opt.step on the instance) or "unbound" (a compiled function calling type(opt).step(opt)).
    """
    model = make_model()
    lr = torch.tensor(HYPER["lr"])
    opt = make_opt(kind, model.parameters(), lr=lr, **(extra or {}))
    if how == "bound":
        step = torch.compile(opt.step, backend=cnt, fullgraph=True)
    elif how == "unbound":
        step = torch.compile(lambda: type(opt).step(opt), backend=cnt, fullgraph=True)
    else:
        step = opt.step
    sched = SCHEDULERS[scheduler](opt) if isinstance(scheduler, str) else scheduler(opt)
    x, y = make_data(SCHEDULE_STEPS)
    lrs = []
    for i in range(SCHEDULE_STEPS):
        opt.zero_grad()
        F.mse_loss(model(x[i]), y[i]).backward()
        step()
        sched.step()
        lrs.append(float(opt.param_groups[0]["lr"]))
    return model, opt, lr, lrs


# The scheduler's own step() counter is bumped by the wrapper it installs on opt.step, which the
# compiled step bypasses; torch then warns about the call order. The warning is expected here.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("how", ["bound", "unbound"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("kind", KINDS)
def test_tensor_lr_schedule_does_not_recompile(kind, scheduler, how):
    cnt = CompileCounter()
    model, opt, lr, lrs = scheduled_training(kind, scheduler, how, cnt)
    # warm-up: the first step (creates state) and the steady state; never again afterwards
    assert cnt.frame_count <= 2, cnt.frame_count
    assert graph_breaks() == 0, dict(counters["graph_break"])
    assert opt.param_groups[0]["lr"] is lr  # the scheduler updated our tensor in place
    assert len(set(lrs)) > 3  # the schedule really changed lr

    # the compiled step saw every new lr: same numbers as the eager step under the same schedule
    ref_model, ref_opt, _, ref_lrs = scheduled_training(kind, scheduler, "eager")
    assert lrs == ref_lrs
    assert_params_equal(model, ref_model)
    assert_state_equal(opt, model, ref_opt, ref_model)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
@pytest.mark.parametrize("kind", KINDS)
def test_tensor_momentum_cycled_by_one_cycle_lr_does_not_recompile(kind):
    """OneCycleLR(cycle_momentum=True) writes a float into group["momentum"] each step; with tensor lr and
    momentum the compiled step must trace once and follow both schedules."""

    def one_cycle(opt):
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=SCHEDULE_STEPS + 1,
                                                   base_momentum=0.8, max_momentum=0.95)

    cnt = CompileCounter()
    extra = {"momentum": torch.tensor(0.9), "nesterov": False}
    model, opt, _, lrs = scheduled_training(kind, one_cycle, "bound", cnt, extra)
    assert cnt.frame_count <= 2, cnt.frame_count
    assert graph_breaks() == 0, dict(counters["graph_break"])
    ref_model, ref_opt, _, ref_lrs = scheduled_training(kind, one_cycle, "eager", None, extra)
    assert lrs == ref_lrs
    assert_params_equal(model, ref_model)
    assert_state_equal(opt, model, ref_opt, ref_model)


# ---- torch.optim.SGD, for contrast ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", [dict(foreach=False), dict(foreach=True)], ids=["for-loop", "foreach"])
def test_torch_optim_sgd_step_graph_breaks_under_fullgraph(impl):
    model = make_model()
    x, y = make_data(1)
    F.mse_loss(model(x[0]), y[0]).backward()
    opt = torch.optim.SGD(model.parameters(), **HYPER, **impl)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
        torch.compile(opt.step, backend="eager", fullgraph=True)()

    # ours, same params and grads: no error, params updated
    ours = torchsgd8.SGD(model.parameters(), **HYPER)
    before = [p.detach().clone() for p in model.parameters()]
    torch.compile(ours.step, backend="eager", fullgraph=True)()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


# ---- forward + gradients + step in one graph ----------------------------------------------------------


def whole_step_training(backend, kind, steps=STEPS):
    model = make_model()
    opt = make_opt(kind, list(model.parameters()))
    train_step = training_step(model, opt, F.mse_loss)
    cnt = None
    if backend is not None:
        cnt = CompileCounterWithBackend(backend)
        train_step = torch.compile(train_step, backend=cnt, fullgraph=True)
    x, y = make_data(steps)
    losses = [train_step(x[i], y[i]) for i in range(steps)]
    return model, opt, torch.stack(losses), cnt


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_grad_and_step_compile_as_one_graph(backend, kind):
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        model, opt, losses, cnt = whole_step_training(backend, kind)
    assert graph_breaks() == 0, dict(counters["graph_break"])
    assert cnt.frame_count <= 2, cnt.frame_count  # first step (state creation), then steady state
    assert losses[-1] < losses[0]
    assert kinds_of_state(opt, model) == ({"fp32", "8bit"} if kind == "8bit" else {"fp32"})

    eager_model, eager_opt, eager_losses, _ = whole_step_training(None, kind)
    if backend == "aot_eager":
        assert torch.equal(losses, eager_losses)
        assert_params_equal(model, eager_model)
        assert_state_equal(opt, model, eager_opt, eager_model)
    else:
        torch.testing.assert_close(losses, eager_losses, atol=1e-6, rtol=0)
        assert_params_equal(model, eager_model, atol=1e-6)
