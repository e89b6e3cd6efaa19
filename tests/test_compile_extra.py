"""Compiler integration beyond the basics of test_compile.py: a whole compiled training step under
OneCycleLR, float hyperparameters under schedules, dynamic shapes, and the autograd contract of the ops."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

import torchsgd8
from torchsgd8 import ops

from helpers import small_model, training_step


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.mark.parametrize("optim_bits", [32, 8])
@pytest.mark.parametrize("momentum", [0.9, "tensor"])
def test_whole_training_step_under_one_cycle_lr_compiles_at_most_twice(optim_bits, momentum):
    """Forward + autograd.grad + step as one fullgraph frame; OneCycleLR changes lr and momentum every
    step for 100 steps: at most 2 frames (the first step creates state), and the same params as eager."""
    momentum = torch.tensor(0.9) if momentum == "tensor" else momentum

    def train(compiled):
        torch._dynamo.reset()
        model = small_model()
        params = list(model.parameters())
        opt = torchsgd8.SGD(params, lr=torch.tensor(0.01), momentum=momentum.clone() if isinstance(momentum, torch.Tensor) else momentum,
                            optim_bits=optim_bits, min_8bit_size=1000)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=120, cycle_momentum=True)
        step = training_step(model, opt, torch.nn.functional.mse_loss)
        counter = CompileCounter()
        run = torch.compile(step, backend=counter, fullgraph=True) if compiled else step
        gen = torch.Generator().manual_seed(1)
        momenta = set()
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            for _ in range(100):
                run(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen))
                sched.step()
                momenta.add(float(opt.param_groups[0]["momentum"]))
        return [p.detach().clone() for p in params], counter.frame_count, momenta

    compiled_params, frames, momenta = train(compiled=True)
    eager_params, _, _ = train(compiled=False)
    assert len(momenta) > 50, "OneCycleLR should have changed momentum nearly every step"
    assert 1 <= frames <= 2
    for a, b in zip(compiled_params, eager_params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_float_lr_under_a_schedule_does_not_recompile(optim_bits):
    """Plain float lr written by a scheduler every step: at most 2 frames in all (the first step creates
    the state), not one per step (README; test_torch_conventions.py checks the inductor and aot_eager
    backends)."""
    model = small_model()
    opt = torchsgd8.SGD(model.parameters(), lr=0.05, momentum=0.9, optim_bits=optim_bits, min_8bit_size=1000)
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=40)
    lrs = set()
    for _ in range(30):
        model(torch.randn(4, 16)).sum().backward()
        step()
        opt.zero_grad()
        sched.step()
        lrs.add(opt.param_groups[0]["lr"])
    assert len(lrs) == 30 and all(isinstance(lr, float) for lr in lrs)
    assert counter.frame_count <= 2


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_dynamic_shapes(optim_bits):
    """compile(dynamic=True): one compiled step serves params of several sizes, with the eager results."""
    counter = CompileCounter()
    for n in (1000, 3000, 70_001):
        start = torch.randn(n, generator=torch.Generator().manual_seed(n))
        results = []
        for compiled in (True, False):
            p = torch.nn.Parameter(start.clone())
            opt = torchsgd8.SGD([p], lr=torch.tensor(0.1), momentum=0.9, optim_bits=optim_bits, min_8bit_size=1)
            step = (torch.compile(lambda: type(opt).step(opt), backend=counter, dynamic=True, fullgraph=True)
                    if compiled else opt.step)
            gen = torch.Generator().manual_seed(0)
            for _ in range(3):
                p.grad = torch.randn(n, generator=gen)
                step()
            results.append(p.detach().clone())
        assert torch.equal(results[0], results[1])


def test_fake_kernels_give_symbolic_shapes():
    """The absmax length is computed from a symbolic numel: ceil(numel / 256)."""
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda v: ops.quantize_blockwise(v), tracing_mode="symbolic")(
        torch.randn(1000))
    codes_node, absmax_node = [n for n in gm.graph.nodes if n.op == "call_function" and "getitem" in str(n.target)]
    numel = codes_node.meta["val"].numel()
    (blocks,) = absmax_node.meta["val"].shape
    assert isinstance(numel, torch.SymInt) and isinstance(blocks, torch.SymInt)
    (size,) = numel.node.expr.free_symbols
    for n in (1, 255, 256, 257, 1000, 2**31 + 300):
        assert int(blocks.node.expr.subs(size, n)) == (int(numel.node.expr.subs(size, n)) + 255) // 256


def test_fake_kernels_give_symbolic_per_row_shapes():
    """per_row: absmax is (rows, ceil(row / 256)) in the symbolic sizes."""
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda v: ops.quantize_blockwise(v, per_row=True),
                                                    tracing_mode="symbolic")(torch.randn(10, 300))
    codes_node, absmax_node = [n for n in gm.graph.nodes if n.op == "call_function" and "getitem" in str(n.target)]
    rows, cols = codes_node.meta["val"].shape
    absmax_rows, blocks = absmax_node.meta["val"].shape
    assert isinstance(blocks, torch.SymInt) and absmax_rows.node.expr == rows.node.expr
    (col_symbol,) = cols.node.expr.free_symbols
    for n in (1, 255, 256, 257, 300, 2**31 + 300):
        assert int(blocks.node.expr.subs(col_symbol, n)) == (n + 255) // 256


@pytest.mark.parametrize("compile_first", [True, False], ids=["compile-then-scheduler", "scheduler-then-compile"])
@pytest.mark.parametrize("scheduler", ["StepLR", "OneCycleLR", "ReduceLROnPlateau", "SequentialLR"])
def test_compiled_step_with_any_scheduler_in_either_order(compile_first, scheduler):
    """torch.compile(opt.step, fullgraph=True) works whether the scheduler exists before or after
    compiling, without the scheduler's 'lr_scheduler.step() before optimizer.step()' warning, and with a
    tensor lr (updated in place by the schedulers) compiles only the two warm-up frames."""
    import warnings

    model = small_model()
    opt = torchsgd8.SGD8bit(model.parameters(), lr=torch.tensor(0.05), momentum=0.9, min_8bit_size=1000)
    make = {
        "StepLR": lambda: torch.optim.lr_scheduler.StepLR(opt, 2),
        "OneCycleLR": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20),
        "ReduceLROnPlateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0),
        "SequentialLR": lambda: torch.optim.lr_scheduler.SequentialLR(
            opt, [torch.optim.lr_scheduler.ConstantLR(opt, 0.5, total_iters=2),
                  torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)], milestones=[2]),
    }[scheduler]
    counter = CompileCounter()
    if compile_first:
        step = torch.compile(opt.step, backend=counter, fullgraph=True)
        sched = make()
    else:
        sched = make()
        step = torch.compile(opt.step, backend=counter, fullgraph=True)
    lrs = []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*optimizer.step.*")
        for _ in range(6):
            loss = model(torch.randn(4, 16)).pow(2).mean()
            loss.backward()
            step()
            opt.zero_grad()
            sched.step(loss.item()) if scheduler == "ReduceLROnPlateau" else sched.step()
            lrs.append(float(opt.param_groups[0]["lr"]))
    assert len(set(lrs)) > 1, "the scheduler should have changed lr"
    assert 1 <= counter.frame_count <= 2


def test_ops_refuse_inputs_that_require_grad():
    """An optimizer update is not differentiable: a clear error, nothing changed; fine under no_grad."""
    p = torch.randn(300, requires_grad=True)
    g, buf = torch.randn(300), torch.zeros(300)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="is not differentiable.*torch.no_grad"):
        ops.sgd_update_([p], [g], [buf], torch.tensor(0.1), torch.tensor(0.9), 0.0, 0.0, False, False, True)
    assert torch.equal(p.detach(), before)
    with pytest.raises(RuntimeError, match="quantize_blockwise is not differentiable"):
        ops.quantize_blockwise(p)
    with torch.no_grad():
        ops.sgd_update_([p], [g], [buf], torch.tensor(0.1), torch.tensor(0.9), 0.0, 0.0, False, False, True)
    assert not torch.equal(p.detach(), before)


def test_opcheck_autograd_registration():
    p = torch.randn(300, requires_grad=True)
    torch.library.opcheck(torch.ops.torchsgd8.quantize_blockwise.default, (p,),
                          test_utils="test_autograd_registration")
    codes, absmax = ops.quantize_blockwise(p.detach())
    torch.library.opcheck(torch.ops.torchsgd8.dequantize_blockwise.default,
                          (codes, absmax.requires_grad_(), torch.float32), test_utils="test_autograd_registration")
    torch.library.opcheck(
        torch.ops.torchsgd8.sgd_update_.default,
        ([torch.randn(300)], [torch.randn(300, requires_grad=True)], [torch.zeros(300)], torch.tensor(0.1),
         torch.tensor(0.9), 0.0, 0.0, False, False, True),
        test_utils="test_autograd_registration")


def test_in_place_ops_bump_version_counters():
    p, g, buf = torch.randn(300), torch.randn(300), torch.zeros(300)
    versions = (p._version, buf._version, g._version)
    ops.sgd_update_([p], [g], [buf], torch.tensor(0.1), torch.tensor(0.9), 0.0, 0.0, False, False, True)
    assert (p._version, buf._version, g._version) == (versions[0] + 1, versions[1] + 1, versions[2])


@pytest.mark.parametrize("case", ["fp32", "8bit", "bf16-stochastic-rounding"])
def test_compiled_step_over_many_params_matches_eager(case):
    """Buckets of more params than one compiled op call takes (optim._COMPILED_CALL_SIZE): the compiled step
    splits them into several calls and gives bit-identical params and state to the eager step, on the first
    step and later ones (with a non-contiguous param among them). A bf16 bucket with stochastic rounding
    stays one call, as its noise is keyed by position in the call."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    from torchsgd8.optim import _COMPILED_CALL_SIZE

    n = 2 * _COMPILED_CALL_SIZE + 5
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    # 8bit: the (300,) params get 8-bit state, the 77-element ones fp32 buffers (two buckets)
    shapes = [(300,) if i % 2 else (7, 11) for i in range(n)]
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, optim_bits=8 if case == "8bit" else 32,
                  min_8bit_size=256, stochastic_rounding=case.startswith("bf16"))

    def make():
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
        params[3] = torch.nn.Parameter(torch.randn(11, 7, generator=g).to(dtype).t())  # non-contiguous
        torch.manual_seed(1)  # the rounding seed
        return params, torchsgd8.SGD(params, **kwargs)

    backend = AotEagerAndRecordGraphs()
    results = []
    for compiled in (False, True):
        params, opt = make()
        step = torch.compile(opt.step, backend=backend, fullgraph=True) if compiled else opt.step
        g = torch.Generator().manual_seed(2)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            step()
        state = [t for p in params for t in opt.state[p].values() if isinstance(t, torch.Tensor)]
        results.append([p.detach() for p in params] + state)
    assert len(results[0]) == len(results[1])
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)

    ops_ = (torch.ops.torchsgd8.sgd_update_.default, torch.ops.torchsgd8.sgd8bit_update_.default)
    assert len(backend.graphs) == 2  # first step, later steps
    for gm in backend.graphs:
        sizes = [len(node.args[0]) for node in gm.graph.nodes if node.target in ops_]
        assert sum(sizes) == n
        if case.startswith("bf16"):
            assert sizes == [n]
        else:
            assert len(sizes) >= 3 and max(sizes) <= _COMPILED_CALL_SIZE
