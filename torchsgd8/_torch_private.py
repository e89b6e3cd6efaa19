"""Every use of torch's private API in torchsgd8: how SGD's step joins torch's optimizer machinery.

torch.optim.Optimizer wraps a subclass's ``step`` in Python code that runs step hooks and opens a
profiler range, LR schedulers replace ``opt.step`` on the instance, and GradScaler looks for an
optimizer-side unscaling protocol. None of these has a public interface for an optimizer to take part in;
what torchsgd8 relies on, all of it below:

* ``torch.optim.optimizer._global_optimizer_pre_hooks`` / ``_global_optimizer_post_hooks`` and
  ``Optimizer._optimizer_step_pre_hooks`` / ``_optimizer_step_post_hooks`` (the hook registries),
  ``Optimizer._optimizer_step_code`` (the profiler's Python tracer hooks it) and the ``hooked`` mark that
  stops ``Optimizer._patch_step_function`` from wrapping a step twice;
* ``torch._C._profiler._RecordFunctionFast`` (the profiler range, opened in C++) and
  ``torch._C._set_grad_enabled`` (grad mode without torch.no_grad's Python context manager);
* ``_wrapped_by_lr_sched`` on ``step`` and the ``_opt_called`` attribute (torch.optim.lr_scheduler);
* ``Optimizer._optimizer_state_dict_pre_hooks`` / ``_post_hooks`` and
  ``_optimizer_load_state_dict_pre_hooks`` / ``_post_hooks`` (the registries that
  ``register_state_dict_pre_hook`` etc. fill; torchsgd8 builds and loads its own state dicts);
* ``_step_supports_amp_scaling`` and the ``grad_scale`` / ``found_inf`` attributes (torch.amp.GradScaler);
* ``torch._C._dispatch_get_all_op_names`` (the dispatcher's list of registered ops, for
  ``python -m torchsgd8``);
* ``torch._disable_dynamo`` (keeps dynamo out of state_dict / load_state_dict, as torch's Optimizer does,
  importing dynamo on the first call: ``torch.compiler.disable`` imports it, and with it triton where
  installed, when the class is defined, which would cost ``import torchsgd8`` seconds).

Checked against torch 2.13.0. Without one of the names the step wrapper uses (FAST_STEP_WRAPPER), the step
falls back to Optimizer's own wrapper: slower, the same behaviour. tests/test_torch_private.py checks every
name against the torch it runs with and fails naming what changed.
"""
from __future__ import annotations

import functools
from itertools import chain
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

try:
    from torch._C._profiler import _RecordFunctionFast
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks
except ImportError:
    _RecordFunctionFast = None

# Whether this torch has everything the fast step wrapper uses; without it Optimizer wraps step itself.
FAST_STEP_WRAPPER = (_RecordFunctionFast is not None and hasattr(torch._C, "_set_grad_enabled")
                     and hasattr(Optimizer, "_optimizer_step_code"))


def adopt_step_protocols(cls: type) -> type:
    """Class decorator for an Optimizer subclass whose ``step`` is decorated with ``@torch.no_grad()`` and
    records each call in ``self._step_record`` (see record_step_called). Makes

    * LR schedulers leave ``opt.step`` alone: each replaces it on the instance with a wrapper (to record
      that step ran) that dynamo refuses to trace, so ``torch.compile(opt.step, fullgraph=True)`` and a
      compiled training step calling ``opt.step()`` would fail once a scheduler exists. Schedulers skip
      the wrapping when step is marked as already wrapped, and read ``_opt_called`` (the "lr_scheduler.step()
      before optimizer.step()" warning) from ``_step_record``, a dict because dynamo replays mutations of
      a dict but drops attribute writes on an optimizer inside a compiled step;
    * GradScaler hand the step ``grad_scale`` / ``found_inf`` (read by amp_scaling_args) instead of
      unscaling the grads first;
    * step hooks and the profiler range run as with Optimizer's wrapper, faster (see _profiled_step).
    """
    step = cls.step
    step._wrapped_by_lr_sched = True
    if FAST_STEP_WRAPPER:
        step = _profiled_step(step)
    cls.step = step
    cls._opt_called = property(_read_step_called, _write_step_called)
    cls._step_supports_amp_scaling = True
    return cls


def record_step_called(opt: Optimizer) -> None:
    """What an LR scheduler's step wrapper would record (see adopt_step_protocols)."""
    opt._step_record["called"] = True


def _read_step_called(opt: Optimizer) -> bool:
    return opt._step_record.get("called", False)


def _write_step_called(opt: Optimizer, value: bool) -> None:
    opt._step_record["called"] = value


def amp_scaling_args(opt: Optimizer) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(grad_scale, found_inf) set on `opt` by GradScaler.step for the duration of the step, else Nones."""
    return getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)


def state_dict_with_hooks(opt: Optimizer, build: Callable[[], dict]) -> dict:
    """``build()``'s state dict, with the hooks torch's ``Optimizer.state_dict`` runs: the pre-hooks
    before, then each post-hook, which may return a replacement."""
    for pre_hook in opt._optimizer_state_dict_pre_hooks.values():
        pre_hook(opt)
    state_dict = build()
    for post_hook in opt._optimizer_state_dict_post_hooks.values():
        result = post_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def load_state_dict_with_hooks(opt: Optimizer, state_dict: Any, load: Callable[[Any], None]) -> None:
    """``load(state_dict)`` with the hooks torch's ``Optimizer.load_state_dict`` runs: each pre-hook gets
    a shallow copy of the state dict and may return a replacement; the post-hooks run after loading."""
    if isinstance(state_dict, dict):
        state_dict = state_dict.copy()
    for pre_hook in opt._optimizer_load_state_dict_pre_hooks.values():
        result = pre_hook(opt, state_dict)
        if result is not None:
            state_dict = result
    load(state_dict)
    for post_hook in opt._optimizer_load_state_dict_post_hooks.values():
        post_hook(opt)


def not_compiled(fn: Callable) -> Callable:
    """fn, run eagerly even when called inside a compiled region (a graph break there), as torch's
    Optimizer.state_dict and load_state_dict are; dynamo is imported on the first call, not here."""
    return torch._disable_dynamo(fn)


def registered_op_names(namespace: str) -> list[str]:
    """The names ("<namespace>::<op>") of every op registered in `namespace`, sorted. torch has no public
    listing of a library's ops."""
    return sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith(f"{namespace}::"))


def _profiled_step(step: Callable) -> Callable:
    """torch.optim.Optimizer's step wrapper (step pre/post hooks, global and per optimizer, and the profiler
    range "Optimizer.step#<class>.step"), with the range opened by the C++ _RecordFunctionFast instead of
    torch's Python record_function, which costs ~100 us per step when the caches are cold, as they are after
    a backward pass (about 20 % of a step of 1M params); for the same reason eager steps switch grad mode off
    directly rather than through torch.no_grad (~35 us). Marked `hooked`: Optimizer does not wrap it again."""

    body = step.__wrapped__  # step without its @torch.no_grad()

    def eager_step(self, *args, **kwargs):  # what @torch.no_grad() does, minus its Python context manager
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return body(self, *args, **kwargs)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if type(self).step is not wrapper:  # a subclass's own step, which Optimizer wrapped, called this one
            return step(self, *args, **kwargs)
        if torch.compiler.is_compiling():  # dynamo traces the hooks; the range is the compiled graph's
            return _run_with_step_hooks(self, step, args, kwargs)
        with _RecordFunctionFast(f"Optimizer.step#{type(self).__name__}.step"):
            return _run_with_step_hooks(self, eager_step, args, kwargs)

    wrapper.hooked = True
    return wrapper


def _run_with_step_hooks(opt: Optimizer, step: Callable, args: tuple, kwargs: dict) -> Any:
    args = (opt, *args)  # as torch's wrapper: hooks see the step's arguments self first, and may replace them
    for pre_hook in chain(_global_optimizer_pre_hooks.values(), opt._optimizer_step_pre_hooks.values()):
        result = pre_hook(opt, args, kwargs)
        if result is not None:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
            args, kwargs = result
    out = step(*args, **kwargs)
    opt._optimizer_step_code()  # where the profiler's Python tracer looks at the optimizer
    for post_hook in chain(opt._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
        post_hook(opt, args, kwargs)
    return out
