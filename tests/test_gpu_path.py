"""The optimizers on the GPU path: the public ops' contract (csrc/op_contract.cpp) handing each call to the
Triton kernels through the kernel ops, with no value read on the host.

On a machine with a CUDA GPU the params live there. Without one, the Triton launchers are registered as the
CPU kernels of the kernel ops for the duration of each test, so CPU params take exactly the GPU path, the
kernels running in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py). Either way every result is
compared bit for bit with the same run on the CPU's C++ kernels.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

triton = pytest.importorskip("triton", reason="the GPU kernels are Triton kernels; triton is not installed")

import torchsgd8  # noqa: E402
from torchsgd8 import triton as triton_kernels  # noqa: E402

OPS = torch.ops.torchsgd8
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


@contextlib.contextmanager
def gpu_path():
    """Runs the body with the Triton kernels behind the ops for DEVICE's tensors: on a GPU they always are;
    on the CPU they are registered here as the kernel ops' CPU kernels, and removed afterwards."""
    if ON_GPU:
        yield
        return
    library = torch.library.Library("torchsgd8", "IMPL")
    try:
        triton_kernels.register_kernels(library, "CPU")
        yield
    finally:
        library._destroy()


@pytest.fixture
def launches(monkeypatch):
    """Counts the Triton launchers' calls (proof that a run took the GPU path)."""
    from torchsgd8.triton import launch

    calls = []
    for name in triton_kernels.KERNEL_OPS.values():
        original = getattr(launch, name)

        def counted(*args, _original=original, _name=name):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(launch, name, counted)
    return calls


def _model(dtype: torch.dtype) -> torch.nn.Module:
    # weights of 4096+ elements get 8-bit state (one per-row, one flat), the biases fp32 momentum
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 160), torch.nn.Tanh(), torch.nn.Linear(160, 40))
    model.extra = torch.nn.Parameter(torch.randn(4500))
    return model.to(dtype)


def _run(device, optimizer, dtype, steps, hyper, scaler_inf_steps=(), compiled=False):
    """`steps` steps with the same grads on `device`; returns the params and the state, on the CPU."""
    model = _model(dtype).to(device)
    opt = optimizer(model.parameters(), min_8bit_size=4096, **hyper)
    step = torch.compile(opt.step, fullgraph=True, backend="inductor") if compiled else opt.step
    gen = torch.Generator().manual_seed(1)
    for i in range(steps):
        for p in model.parameters():
            grad = torch.randn(p.shape, generator=gen).to(dtype)
            if i in scaler_inf_steps and p.dim() == 1:
                grad[0] = float("inf")
            p.grad = grad.to(device)
        if scaler_inf_steps:  # GradScaler's protocol, as scaler.step(opt) drives it
            opt.grad_scale = torch.tensor(2.0, device=device)
            opt.found_inf = torch.tensor(float(i in scaler_inf_steps), device=device)
            for p in model.parameters():
                p.grad.mul_(2.0)
        step()
    params = [p.detach().cpu() for p in model.parameters()]
    state = [{k: v.detach().cpu() for k, v in opt.state[p].items()} for p in model.parameters()]
    return params, state


def _assert_same_run(got, want):
    for i, (a, b) in enumerate(zip(got[0], want[0])):
        assert a.dtype == b.dtype and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), \
            f"param {i} differs"
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        assert a.keys() == b.keys(), f"state {i}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert torch.equal(a[key], b[key]), f"state {i}[{key!r}] differs"


CASES = {
    "8bit-nesterov-wd": (torchsgd8.SGD8bit, torch.float32, dict(lr=0.05, momentum=0.9, nesterov=True,
                                                                weight_decay=1e-2)),
    "8bit-dampening-maximize": (torchsgd8.SGD8bit, torch.float32, dict(lr=0.05, momentum=0.8, dampening=0.3,
                                                                       maximize=True)),
    "8bit-bf16-stochastic": (torchsgd8.SGD8bit, torch.bfloat16, dict(lr=0.05, momentum=0.9,
                                                                     stochastic_rounding=True)),
    "8bit-fp16": (torchsgd8.SGD8bit, torch.float16, dict(lr=0.05, momentum=0.9)),
    "32bit-nesterov-wd": (torchsgd8.SGD32bit, torch.float32, dict(lr=0.05, momentum=0.9, nesterov=True,
                                                                  weight_decay=1e-2)),
    "32bit-fp64": (torchsgd8.SGD32bit, torch.float64, dict(lr=0.05, momentum=0.9)),
    "plain-sgd": (torchsgd8.SGD32bit, torch.float32, dict(lr=0.05)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_steps_on_the_gpu_path_are_the_cpu_kernels_bit_for_bit(case, launches):
    optimizer, dtype, hyper = CASES[case]
    if hyper.get("stochastic_rounding"):
        torch.manual_seed(5)  # the rounding seed is drawn from the default generator
    want = _run("cpu", optimizer, dtype, 3, copy.deepcopy(hyper))
    assert not launches, "the CPU reference must run on the C++ kernels"
    if hyper.get("stochastic_rounding"):
        torch.manual_seed(5)
    with gpu_path():
        got = _run(DEVICE, optimizer, dtype, 3, copy.deepcopy(hyper))
    assert launches, "the run did not reach the Triton kernels"
    _assert_same_run(got, want)


def test_grad_scaler_skips_on_the_gpu_path_as_on_the_cpu(launches):
    """found_inf on the device: a skipped first step leaves empty momentum (zeroed by the contract on the
    device), a skipped later step changes nothing, and the step counters count only the steps that ran."""
    hyper = dict(lr=0.05, momentum=0.9, dampening=0.1)
    want = _run("cpu", torchsgd8.SGD8bit, torch.float32, 4, hyper, scaler_inf_steps=(0, 2))
    with gpu_path():
        got = _run(DEVICE, torchsgd8.SGD8bit, torch.float32, 4, hyper, scaler_inf_steps=(0, 2))
    assert launches
    _assert_same_run(got, want)
    assert [float(s["step"]) for s in got[1] if "step" in s] == [2.0, 2.0, 2.0]


def test_a_tensor_momentum_of_zero_on_the_gpu_path(launches):
    hyper = dict(lr=0.05, momentum=torch.tensor(0.0, dtype=torch.float64))
    want = _run("cpu", torchsgd8.SGD8bit, torch.float32, 2, copy.deepcopy(hyper))
    with gpu_path():
        got = _run(DEVICE, torchsgd8.SGD8bit, torch.float32, 2, copy.deepcopy(hyper))
    assert launches
    _assert_same_run(got, want)


def test_a_compiled_step_on_the_gpu_path(launches):
    """torch.compile(opt.step, fullgraph=True) with Inductor: the graph calls the ops, which take the GPU path."""
    hyper = dict(lr=0.05, momentum=0.9, nesterov=True)
    want = _run("cpu", torchsgd8.SGD8bit, torch.float32, 3, hyper)
    torch._dynamo.reset()
    with gpu_path():
        got = _run(DEVICE, torchsgd8.SGD8bit, torch.float32, 3, hyper, compiled=True)
    assert launches
    _assert_same_run(got, want)


def _op_samples(device):
    gen = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    params, grads = [randn(300), randn(4, 300)], [randn(300), randn(4, 300)]
    codes = [torch.full((300,), 127, dtype=torch.uint8, device=device),
             torch.full((4, 300), 140, dtype=torch.uint8, device=device)]
    absmax = [torch.ones(2, device=device), torch.ones(4, 2, device=device)]
    lr, momentum = torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)
    steps = [torch.zeros((), device=device), torch.zeros((), device=device)]
    found_inf, grad_scale = torch.zeros((), device=device), torch.ones((), device=device)
    return [
        (OPS.sgd8bit_update_, (params, grads, codes, absmax, lr, momentum, 0.0, 0.0, False, False, False),
         dict(steps=steps, found_inf=found_inf, grad_scale=grad_scale)),
        (OPS.sgd_update_, (params, grads, [torch.zeros_like(p) for p in params], lr, momentum, 0.1, 0.01, False,
                           True, False), {}),
        (OPS.quantize_blockwise, (randn(4, 300), True), {}),
        (OPS.dequantize_blockwise, (codes[1], absmax[1], torch.bfloat16), {}),
    ]


@pytest.mark.parametrize("index", range(4), ids=["sgd8bit_update_", "sgd_update_", "quantize_blockwise",
                                                 "dequantize_blockwise"])
def test_opcheck_on_the_gpu_path(index, launches):
    op, args, kwargs = _op_samples(DEVICE)[index]
    with gpu_path():
        torch.library.opcheck(op, args, kwargs)
    assert launches


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_capture_of_a_compiled_step():
    """torch.compile(mode="reduce-overhead") captures the step in a CUDA graph and replays it: the results
    after replays are those of eager steps. lr is a device tensor (a CPU one would be copied at each step)."""
    results = []
    for mode in (None, "reduce-overhead"):
        torch.manual_seed(0)
        model = _model(torch.float32).to(DEVICE)
        opt = torchsgd8.SGD8bit(model.parameters(), lr=torch.tensor(0.05, device=DEVICE), momentum=0.9)
        step = opt.step if mode is None else torch.compile(opt.step, mode=mode)
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            step()
        results.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
