"""torch's private API that torchsgd8 relies on (torchsgd8/_torch_private.py) is still there and still
means what that module assumes. These tests exercise torch itself, with probe optimizers; a failure names
what torch changed, and _torch_private.py has to follow it. (What our step does with it is specified in
test_optimizer_api.py: hooks, profiler range, LR schedulers; test_mixed_precision.py: GradScaler.)"""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from torch.optim import Optimizer, lr_scheduler
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import torchsgd8
from torchsgd8 import _torch_private

CHANGED = "torch changed {what}; torchsgd8/_torch_private.py relies on it"


class _Probe(Optimizer):
    """An optimizer whose step records what it sees."""

    def __init__(self):
        super().__init__([torch.nn.Parameter(torch.zeros(2))], {"lr": 0.1})
        self.seen = []

    def step(self, closure=None):
        self.seen.append((getattr(self, "grad_scale", None), getattr(self, "found_inf", None)))


@pytest.mark.parametrize("module, name", [
    ("torch._C._profiler", "_RecordFunctionFast"),
    ("torch._C", "_set_grad_enabled"),
    ("torch._C", "_dispatch_get_all_op_names"),
    ("torch", "_disable_dynamo"),
    ("torch.optim.optimizer", "_global_optimizer_pre_hooks"),
    ("torch.optim.optimizer", "_global_optimizer_post_hooks"),
])
def test_private_names_exist(module, name):
    assert hasattr(importlib.import_module(module), name), CHANGED.format(what=f"{module}.{name}: it is gone")


def test_the_fast_step_wrapper_is_in_use():
    assert _torch_private.FAST_STEP_WRAPPER, CHANGED.format(what="a name the step wrapper uses (see the tests above)")
    assert getattr(torchsgd8.SGD.step, "hooked", False) and torchsgd8.SGD.step.__name__ == "step"


def test_record_function_fast_opens_a_profiler_range():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with _torch_private._RecordFunctionFast("torchsgd8.probe"):
            torch.zeros(1).add_(1)
    assert "torchsgd8.probe" in {e.name for e in prof.events()}, \
        CHANGED.format(what="_RecordFunctionFast: it no longer opens a profiler range")


def test_set_grad_enabled_switches_grad_mode():
    before = torch.is_grad_enabled()
    try:
        torch._C._set_grad_enabled(not before)
        assert torch.is_grad_enabled() is (not before), CHANGED.format(what="torch._C._set_grad_enabled")
    finally:
        torch._C._set_grad_enabled(before)


def test_dispatcher_lists_our_ops():
    names = _torch_private.registered_op_names("torchsgd8")
    assert "torchsgd8::sgd_update_" in names and "torchsgd8::quantize_blockwise" in names, \
        CHANGED.format(what=f"torch._C._dispatch_get_all_op_names: our ops are not among its names ({names})")
    assert all(name.startswith("torchsgd8::") for name in names)


def test_hook_registries_are_the_dicts_register_fills():
    opt = _Probe()
    hooks = [lambda o, a, k: None for _ in range(4)]
    handles = [register_optimizer_step_pre_hook(hooks[0]), register_optimizer_step_post_hook(hooks[1]),
               opt.register_step_pre_hook(hooks[2]), opt.register_step_post_hook(hooks[3])]
    try:
        registries = {
            "torch.optim.optimizer._global_optimizer_pre_hooks": _torch_private._global_optimizer_pre_hooks,
            "torch.optim.optimizer._global_optimizer_post_hooks": _torch_private._global_optimizer_post_hooks,
            "Optimizer._optimizer_step_pre_hooks": getattr(opt, "_optimizer_step_pre_hooks", {}),
            "Optimizer._optimizer_step_post_hooks": getattr(opt, "_optimizer_step_post_hooks", {}),
        }
        for (what, registry), hook, handle in zip(registries.items(), hooks, handles):
            assert registry.get(handle.id) is hook, CHANGED.format(what=f"{what}: the registered hook is not there")
    finally:
        for handle in handles:
            handle.remove()


def test_optimizer_step_code_is_what_torch_calls_after_step():
    assert callable(getattr(Optimizer, "_optimizer_step_code", None)), \
        CHANGED.format(what="Optimizer._optimizer_step_code (the profiler's Python tracer hooks it): it is gone")
    calls = []
    opt = _Probe()
    opt._optimizer_step_code = lambda: calls.append(1)
    opt.step()
    assert calls == [1], CHANGED.format(what="Optimizer's step wrapper: it no longer calls _optimizer_step_code")


def test_a_step_marked_hooked_is_not_wrapped_again():
    def step(self, closure=None):
        return None

    step.hooked = True
    probe = type("HookedProbe", (Optimizer,), {"step": step})
    probe([torch.nn.Parameter(torch.zeros(2))], {"lr": 0.1})
    assert probe.step is step, CHANGED.format(what="Optimizer._patch_step_function: it wraps a step marked `hooked`")


def test_lr_schedulers_leave_a_marked_step_alone_and_read_opt_called():
    opt = _Probe()
    type(opt).step._wrapped_by_lr_sched = True  # what _torch_private marks our step with
    try:
        sched = lr_scheduler.StepLR(opt, step_size=1)
        assert "step" not in vars(opt), CHANGED.format(what="lr_scheduler: it wraps a step marked _wrapped_by_lr_sched")
        with pytest.warns(UserWarning, match=r"before `optimizer.step\(\)`"):
            sched.step()  # _opt_called unset: the scheduler warns
        opt._opt_called = True
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sched.step()  # no warning once _opt_called is set
    finally:
        del type(opt).step._wrapped_by_lr_sched


def test_grad_scaler_hands_grad_scale_and_found_inf_to_a_supporting_step():
    opt = _Probe()
    opt._step_supports_amp_scaling = True
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    param = opt.param_groups[0]["params"][0]
    scaler.scale(param.sum()).backward()
    scaler.step(opt)
    assert len(opt.seen) == 1
    grad_scale, found_inf = opt.seen[0]
    assert isinstance(grad_scale, torch.Tensor) and isinstance(found_inf, torch.Tensor), \
        CHANGED.format(what="GradScaler's _step_supports_amp_scaling protocol: grad_scale / found_inf not set")
    assert grad_scale.item() == 4.0 and found_inf.item() == 0.0
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # only for the duration of step


def test_state_dict_hook_registries_are_the_dicts_register_fills():
    opt = _Probe()
    registrations = {
        "_optimizer_state_dict_pre_hooks": opt.register_state_dict_pre_hook,
        "_optimizer_state_dict_post_hooks": opt.register_state_dict_post_hook,
        "_optimizer_load_state_dict_pre_hooks": opt.register_load_state_dict_pre_hook,
        "_optimizer_load_state_dict_post_hooks": opt.register_load_state_dict_post_hook,
    }
    for name, register in registrations.items():
        hook = lambda *args: None  # noqa: E731
        handle = register(hook)
        assert getattr(opt, name, {}).get(handle.id) is hook, \
            CHANGED.format(what=f"Optimizer.{name}: the registered hook is not there")
        handle.remove()
        assert handle.id not in getattr(opt, name)


def test_not_compiled_runs_eagerly_inside_a_compiled_function_and_imports_dynamo_lazily():
    """torch._disable_dynamo: the function runs as Python (a graph break where it is called), and dynamo is
    not imported until then."""
    import subprocess
    import sys

    code = ("import sys, torch; from torchsgd8 import _torch_private; "
            "f = _torch_private.not_compiled(lambda x: x + 1); "
            "assert 'torch._dynamo' not in sys.modules, 'dynamo imported by the decorator'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

    seen = []

    @_torch_private.not_compiled
    def eager(x):
        seen.append(torch.compiler.is_compiling())
        return x + 1

    compiled = torch.compile(lambda x: eager(x) * 2, backend="eager")
    assert torch.equal(compiled(torch.ones(2)), torch.full((2,), 4.0))
    assert seen == [False], CHANGED.format(what="torch._disable_dynamo: the function was traced")
