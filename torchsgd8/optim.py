"""SGD, SGD8bit and SGD32bit: the bitsandbytes constructors with torch.optim.SGD's exact semantics.

``step()`` reads as torch.optim.SGD's: for each param group, its params go into buckets (_buckets.py:
same device, dtype, state kind and first step), and each bucket is one fused op call (ops.py). Which
state a param gets is _layout.py's rule, user input is checked by _checks.py, state dicts are converted
by _state.py, and how the step joins torch's hooks, profiler, LR schedulers and GradScaler is in
_torch_private.py. All math is in the kernels (csrc/).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _state, ops
from ._buckets import Bucket, GroupPlan, collect_buckets, planned_buckets
from ._checks import check_grad, check_torch_sgd_flags, read_bnb_args, validate_group
from ._layout import EIGHT_BIT, codebook_copy, local
from ._torch_private import (adopt_step_protocols, amp_scaling_args, load_state_dict_with_hooks, not_compiled,
                             record_step_called, state_dict_with_hooks)

__all__ = ["SGD", "SGD8bit", "SGD32bit"]

# Under torch.compile a bucket's op call is split into calls on at most this many params. Inductor's
# decomposition of the functionalized mutable op (post-grad pass decompose_auto_functionalized, torch 2.13)
# takes time quadratic in the number of tensors of one call: with 124 params in one bucket it was the
# largest single compile cost, with 244 params over a third of the whole compile time. The params of a
# bucket are independent, so the chunks give bit-identical results; eager calls stay whole (one parallel
# region per bucket).
_COMPILED_CALL_SIZE = 32

# Devices whose buckets get the CPU's hyperparameter tensors: the CPU kernels read them on the host, and the
# meta kernels read nothing.
_HOST_DEVICES = ("cpu", "meta")


def _ensure_rounding_seed(group: dict) -> None:
    if group.get("stochastic_rounding") and "rounding_seed" not in group:
        group["rounding_seed"] = torch.randint(0, 2**62, (), dtype=torch.int64)


def _float64_tensor(value: float, device: Optional[torch.device]) -> Tensor:
    """`value` as a 0-dim float64 tensor on `device` (None: the CPU), for the ops. Made by adding it to a zero
    tensor: under torch.compile a Python float added to a tensor stays symbolic (a graph input), so a schedule
    that writes a new float every step does not recompile, whereas torch.tensor(value) needs the concrete
    value, and dynamo would specialise on it and recompile for each new one. On a GPU this copies nothing
    from the host (a host-to-device copy from pageable memory waits for the device)."""
    return torch.zeros((), dtype=torch.float64, device=device) + value


def _docstring(summary: str, state: str, optim_bits_arg: str = "") -> str:
    """A class docstring: `summary`, `state` (the momentum state kept), the arguments."""
    return f"""{summary}

    The update is exactly torch.optim.SGD's, and the constructor takes torch.optim.SGD's arguments as
    well as bitsandbytes'. {state}

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs (``model.named_parameters()``;
            each group then keeps the names as ``param_names``), or of param-group dicts, which may set
            any of the hyperparameters below (``lr`` to ``stochastic_rounding``, except ``args``).
        lr: learning rate (default 1e-3, as torch's). A number or a 1-element tensor; LR schedulers write
            a new float into each group's ``lr``, or update a tensor in place, and neither recompiles a
            compiled step. Groups that don't set their own lr share the default: one tensor for all.
        momentum: momentum factor (default 0: plain SGD, no state). A number or a 1-element tensor; a
            tensor momentum always keeps a buffer, since reading its value would sync a device.
        dampening: dampening for momentum (default 0).
        weight_decay: L2 penalty added to the gradient (default 0). A number or a 1-element tensor (a
            tensor's value is read on the host at every step: use a number under torch.compile).
        nesterov: Nesterov momentum (default False); needs momentum > 0 and dampening 0.
{optim_bits_arg}        args: a bitsandbytes argument object (often an argparse namespace): its ``optim_bits`` and
            ``min_8bit_size`` override the keywords; bitsandbytes features torchsgd8 does not implement
            (``percentile_clipping``, ``max_unorm``, ...) raise NotImplementedError unless off.
        min_8bit_size: params with fewer elements keep a full-precision buffer even with 8-bit state
            (default 4096).
        maximize: maximize the objective instead of minimizing it (default False).
        stochastic_rounding: round bf16 params stochastically after each update (default False;
            unbiased, so updates below half a bf16 ulp are not lost on average). Reproducible: the group's
            ``rounding_seed`` (an int64 tensor drawn from torch's default generator, saved in the state
            dict) advances every step.
        foreach, fused: accepted as torch.optim.SGD takes them, and choose nothing: torchsgd8 always
            makes one fused op call per (device, dtype, state kind) bucket of a group's params. Both
            True raises RuntimeError, as in torch.
        differentiable: must be False: the fused ops are not differentiable (NotImplementedError).
    """


_EIGHT_BIT_STATE = """The momentum of float32, bfloat16 and float16 params with at least
    ``min_8bit_size`` elements is kept as 8-bit codes, in blocks of 256 with one float32 absmax each
    (bitsandbytes' ``state1``, ``absmax1``, ``qmap1``, ``step``); other params keep torch's
    ``momentum_buffer``."""
_FULL_STATE = "The momentum buffer is torch's ``momentum_buffer``, in the param's dtype."


@adopt_step_protocols
class SGD(Optimizer):
    __doc__ = _docstring(
        "Stochastic gradient descent with momentum kept in 32 or 8 bits (bitsandbytes' ``SGD``).",
        "``optim_bits`` chooses the momentum state.",
        """        optim_bits: 32 (default): the momentum buffer is torch's ``momentum_buffer``, in the param's
            dtype. 8: float32, bfloat16 and float16 params of at least ``min_8bit_size`` elements keep
            it as 8-bit codes (bitsandbytes' ``state1``, ``absmax1``, ``qmap1``, ``step``).
""")

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float | Tensor = 0,
        dampening: float | Tensor = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        *,
        maximize: bool = False,
        stochastic_rounding: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
    ) -> None:
        check_torch_sgd_flags(foreach, fused, differentiable)
        optim_bits, min_8bit_size = read_bnb_args(args, optim_bits, min_8bit_size)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            optim_bits=optim_bits,
            min_8bit_size=min_8bit_size,
            stochastic_rounding=stochastic_rounding,
        )
        validate_group({**defaults, "params": []})
        self._qmaps: dict[torch.device, Tensor] = {}
        self._step_record: dict[str, bool] = {}  # see _torch_private.adopt_step_protocols
        self._plans: dict[int, GroupPlan] = {}  # by id(param group)
        self._hyper_tensors: dict[tuple, tuple[float, Tensor]] = {}  # by (id(param group), name, device)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            if len({id(p) for p in group["params"]}) != len(group["params"]):
                # torch only warns; updating one tensor twice in one fused call would race between threads
                raise ValueError("torchsgd8: duplicate parameters in a param group (a tensor appears twice)")
            validate_group(group)
        except (ValueError, TypeError):
            self.param_groups.pop()  # a rejected group must not stay in the optimizer
            raise
        _ensure_rounding_seed(group)

    def _codebook(self, device: torch.device) -> Tensor:
        """One shared copy of the 256-entry codebook per device (bitsandbytes' `qmap1`)."""
        if device not in self._qmaps:
            self._qmaps[device] = codebook_copy(device)
        return self._qmaps[device]

    # ---- step --------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        record_step_called(self)
        grad_scale, found_inf = amp_scaling_args(self)
        # every grad is checked before any state is created or any param changes: a bad grad in the last
        # group must not leave earlier groups updated or new zero state behind
        param_groups = self.param_groups  # read once: under torch.compile each read re-walks every group
        compiling = torch.compiler.is_compiling()
        planned = [None if compiling else self._planned_buckets(group) for group in param_groups]
        for g, (group, buckets) in enumerate(zip(param_groups, planned)):
            if buckets is None:  # a plan has checked the grads it holds
                for i, p in enumerate(group["params"]):
                    if p.grad is not None:
                        check_grad(p, p.grad, g, i)
        for group, buckets in zip(param_groups, planned):
            self._update_group(group, buckets, grad_scale, found_inf, compiling)
        return loss

    def _update_group(self, group: dict, buckets: Optional[list[Bucket]], grad_scale: Optional[Tensor],
                      found_inf: Optional[Tensor], compiling: bool) -> None:
        """One op call per bucket of the group's params: `buckets` from its plan, else collected here."""
        staged: list[tuple[Tensor, Tensor]] = []  # (param, contiguous copy) for non-contiguous params
        created: list[Tensor] = []  # params whose state this step creates
        if buckets is None:
            buckets = self._collect_buckets(group, staged, created, plan=not compiling)

        rounding_seed = group.get("rounding_seed") if group.get("stochastic_rounding") else None
        for bucket_index, b in enumerate(buckets):
            # float hyperparameters as tensors on the bucket's device: the GPU kernels read them there
            device = None if b.device.type in _HOST_DEVICES else b.device
            lr = self._hyper_tensor(group, "lr", device, compiling)
            momentum = self._hyper_tensor(group, "momentum", device, compiling)
            # a distinct noise stream per bucket (the kernel's noise is keyed by position in the bucket)
            seed = rounding_seed + (bucket_index << 32) if rounding_seed is not None and b.dtype == torch.bfloat16 else None
            common = (lr, momentum, float(group["dampening"]), float(group["weight_decay"]),
                      bool(group["nesterov"]), bool(group["maximize"]), b.first_step, grad_scale, found_inf, seed)
            # chunked only without a rounding seed: the kernel keys its noise by position in the call
            n = len(b.params)
            size = _COMPILED_CALL_SIZE if seed is None and compiling else n
            for i in range(0, n, size):
                j = i + size
                if b.kind is EIGHT_BIT:  # counts the steps too (a skipped step does not count, as in torch's fused optimizers)
                    ops.sgd8bit_update_(b.params[i:j], b.grads[i:j], b.codes[i:j], b.absmax[i:j], *common,
                                        steps=b.steps[i:j])
                else:
                    ops.sgd_update_(b.params[i:j], b.grads[i:j], b.buffers[i:j], *common)
        for p, work in staged:
            local(p).copy_(work)
        if rounding_seed is not None and buckets:
            rounding_seed.add_(1)  # fresh noise next step
        if created and found_inf is not None and not compiling and bool(found_inf):
            # GradScaler skipped a step that would have been these params' first: forget their new state,
            # so the next step is their first (buffer = gradient, no dampening), as with torch.optim.SGD.
            # Only on a param's first step does this read found_inf (a sync on accelerators). A compiled step
            # cannot branch on it without a graph break, so there the zero state stays: the next step then
            # treats it as a later step, which differs from torch only when dampening != 0.
            for p in created:
                del self.state[p]

    def _hyper_tensor(self, group: dict, name: str, device: Optional[torch.device], compiling: bool) -> Tensor:
        """group[name] as a 0-dim tensor (a number's on `device`; a tensor as it is). Eager steps reuse the last
        one made while the value stays the same (making one costs ~2 us)."""
        value = group[name]
        if isinstance(value, Tensor):
            return value
        if compiling:  # a float as it is, to keep it symbolic (see _float64_tensor); numpy scalars converted
            return _float64_tensor(value if isinstance(value, float) else float(value), device)
        key = (id(group), name, device)
        cached = self._hyper_tensors.get(key)
        if cached is None or cached[0] != value:
            cached = self._hyper_tensors[key] = (value, _float64_tensor(float(value), device))
        return cached[1]

    def _collect_buckets(self, group: dict, staged: list, created: list, plan: bool) -> list[Bucket]:
        """The full pass (_buckets.collect_buckets); with `plan`, keeps the group's plan for later steps
        where one applies, and drops a stale one otherwise."""
        buckets, new_plan = collect_buckets(group, self.state, self._codebook, staged, created, make_plan=plan)
        if new_plan is not None:
            self._plans[id(group)] = new_plan
        elif plan:
            self._plans.pop(id(group), None)
        return buckets

    def _planned_buckets(self, group: dict) -> Optional[list[Bucket]]:
        """The group's buckets from its plan, or None where there is none or it does not apply."""
        plan = self._plans.get(id(group))
        return None if plan is None else planned_buckets(plan, group, self.state)

    # ---- state dict ----------------------------------------------------------------------------------

    @not_compiled
    def state_dict(self) -> dict[str, Any]:
        """torch's layout (``state`` keyed by param index, ``param_groups``) plus a format version.

        fp32 buffers are ``momentum_buffer`` (as torch.optim.SGD); 8-bit ones are bitsandbytes' ``step``,
        ``state1``, ``absmax1``, ``qmap1``. Only tensors and Python numbers: ``torch.load(weights_only=True)``
        reads it. Hooks registered with ``register_state_dict_pre_hook`` / ``_post_hook`` run as for torch's
        optimizers (post-hooks see the format version). ``torchsgd8.to_torch_state_dict`` and
        ``torchsgd8.to_bitsandbytes_state_dict`` convert it for torch.optim.SGD and bitsandbytes.
        """
        return state_dict_with_hooks(self, lambda: _state.pack_state_dict(self.param_groups, self.state))

    @not_compiled
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict saved by torchsgd8, torch.optim.SGD, or bitsandbytes' SGD / SGD8bit / SGD32bit.

        Momentum is converted to this optimizer's precision (fp32 <-> 8-bit) where they differ. Every key,
        shape and dtype is validated before anything changes; errors name the offending parameter. Hooks
        registered with ``register_load_state_dict_pre_hook`` / ``_post_hook`` run as for torch's optimizers.
        """
        load_state_dict_with_hooks(self, state_dict, self._load_state_dict)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups, state = _state.convert_state_dict(self.param_groups, state_dict, self._codebook)
        self.__setstate__({"state": state, "param_groups": groups})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Optimizer.__setstate__ adds differentiable=False to the defaults (torch's optimizers keep it in
        # every group); torchsgd8's groups hold no such key, and the loop below would add it to each
        self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("_qmaps", {})
        self.__dict__.setdefault("_step_record", {})
        self._plans = {}
        self._hyper_tensors = {}
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            _ensure_rounding_seed(group)


class _FixedPrecisionSGD(SGD):
    """SGD with the precision of its momentum fixed by the class (``optim_bits``), as bitsandbytes' SGD8bit and
    SGD32bit: the same arguments less ``optim_bits``."""

    optim_bits: int

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, args=None,
                 min_8bit_size=4096, *, maximize=False, stochastic_rounding=False, foreach=None,
                 differentiable=False, fused=None):
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, self.optim_bits, args,
                         min_8bit_size, maximize=maximize, stochastic_rounding=stochastic_rounding,
                         foreach=foreach, differentiable=differentiable, fused=fused)


class SGD8bit(_FixedPrecisionSGD):
    __doc__ = _docstring(
        "SGD with 8-bit blockwise-quantized momentum: ``SGD(..., optim_bits=8)`` (bitsandbytes' ``SGD8bit``).",
        _EIGHT_BIT_STATE)
    optim_bits = 8


class SGD32bit(_FixedPrecisionSGD):
    __doc__ = _docstring(
        "SGD with a full-precision momentum buffer: ``SGD(..., optim_bits=32)`` (bitsandbytes' ``SGD32bit``).",
        _FULL_STATE)
    optim_bits = 32
