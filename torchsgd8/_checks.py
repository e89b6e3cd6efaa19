"""Checks of user input, with the messages users see: param groups (at construction, add_param_group and
load_state_dict), bitsandbytes' `args` object, and grads (each step, before anything changes)."""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor

# bitsandbytes' `args` fields we can be asked about, with the values meaning "feature off". Fields we
# implement (optim_bits, min_8bit_size) are read; the others must keep these values.
_BNB_ARGS_UNSUPPORTED_DEFAULTS = {
    "percentile_clipping": 100,
    "max_unorm": 0.0,
    "skip_zeros": False,
    "block_wise": True,
    "is_paged": False,
}


def _is_number(value: Any) -> bool:
    """Python and numpy ints and floats (numbers.Real), not bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_hyperparameter(name: str, value: Any) -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"torchsgd8: Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(f"torchsgd8: Tensor {name} must not require grad")
        number = float(value.detach().cpu())
    elif _is_number(value):
        number = float(value)
    else:
        raise TypeError(f"torchsgd8: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(number):
        raise ValueError(f"Invalid {name} value: {number} (must be finite)")
    if number < 0.0:
        raise ValueError(f"Invalid {name} value: {number} (must be >= 0)")


def validate_group(group: dict) -> None:
    """Checks one param group's hyperparameters and params; raises ValueError/TypeError a user can act on."""
    for key, name in (("lr", "learning rate"), ("momentum", "momentum"), ("dampening", "dampening"),
                      ("weight_decay", "weight_decay")):
        _check_hyperparameter(name, group[key])
    if group["nesterov"] and (float(group["momentum"]) <= 0 or group["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    if group["optim_bits"] not in (8, 32):
        raise ValueError(f"torchsgd8: optim_bits must be 8 or 32, got {group['optim_bits']!r}")
    if not isinstance(group.get("stochastic_rounding", False), bool):
        raise TypeError("torchsgd8: stochastic_rounding must be a bool")
    if not isinstance(group["min_8bit_size"], int) or group["min_8bit_size"] < 0:
        raise ValueError(f"torchsgd8: min_8bit_size must be an int >= 0, got {group['min_8bit_size']!r}")
    for p in group["params"]:
        if p.is_sparse:
            raise ValueError("torchsgd8: sparse parameters are not supported")
        if not (p.is_floating_point() or p.is_complex()):
            raise ValueError(f"torchsgd8: can only optimize floating-point or complex params, got {p.dtype}")


def check_torch_sgd_flags(foreach: Any, fused: Any, differentiable: Any) -> None:
    """torch.optim.SGD's `foreach`, `fused` and `differentiable`. torchsgd8 has one implementation, fused
    ops making one call per bucket, so `foreach` and `fused` choose nothing; their contradictory
    combinations raise torch's errors, and `differentiable=True` is not implemented."""
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if differentiable:
        raise NotImplementedError("torchsgd8: differentiable=True is not supported: the fused update ops are "
                                  "not differentiable, autograd cannot go through a step (use torch.optim.SGD)")


def read_bnb_args(args: Any, optim_bits: int, min_8bit_size: int) -> tuple[int, int]:
    """bitsandbytes' `args` object overrides optim_bits / min_8bit_size; features we do not implement
    must be left at their 'off' value rather than silently ignored. Unrelated attributes (args is often
    a whole argparse namespace) are ignored."""
    if args is None:
        return optim_bits, min_8bit_size
    for name, off in _BNB_ARGS_UNSUPPORTED_DEFAULTS.items():
        if hasattr(args, name) and getattr(args, name) != off:
            raise NotImplementedError(
                f"torchsgd8: args.{name}={getattr(args, name)!r} is not supported "
                f"(only {off!r}); torchsgd8 implements optim_bits and min_8bit_size from `args`"
            )
    return getattr(args, "optim_bits", optim_bits), getattr(args, "min_8bit_size", min_8bit_size)


def check_grad(p: Tensor, grad: Tensor, group_index: int, param_index: int) -> None:
    """Raises unless grad can update p: dense, with p's dtype, shape and device. The message is only built
    on failure: under torch.compile this runs once per param while tracing."""
    if not (grad.layout == torch.strided and grad.dtype == p.dtype and grad.shape == p.shape
            and grad.device == p.device):
        where = f"param {param_index} in group {group_index}"
        if grad.layout != torch.strided:
            raise RuntimeError(f"torchsgd8: the grad of {where} is sparse; sparse gradients are not supported "
                               "(use torch.optim.SGD)")
        raise RuntimeError(
            f"torchsgd8: the grad of {where} ({grad.dtype}, shape {tuple(grad.shape)}, {grad.device}) must match "
            f"its param ({p.dtype}, shape {tuple(p.shape)}, {p.device})"
        )
