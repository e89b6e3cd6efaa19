"""torchsgd8 behaves as torch.optim does: float hyperparameters under a schedule compile like tensor ones
(with the inductor and aot_eager backends, where dynamo's handling of floats matters), and the state-dict
protocol (hooks, param names, round trips, the GradScaler flag) is torch's."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import torchsgd8

from helpers import training_step


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    torch.manual_seed(0)
    # 16x300 = 4800 elements: 8-bit state with min_8bit_size=1000; the biases keep fp32 momentum
    return torch.nn.Sequential(torch.nn.Linear(16, 300), torch.nn.ReLU(), torch.nn.Linear(300, 4))


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
        model = _model()
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
        model = _model()
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
