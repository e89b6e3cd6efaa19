"""State-dict format: version, validation, conversion from torch.optim.SGD and bitsandbytes layouts, and
export to them (to_torch_state_dict, to_bitsandbytes_state_dict).

Per-param state in torchsgd8 is one of
  * nothing (momentum == 0, or the param never had a gradient),
  * ``{"momentum_buffer": Tensor}`` in the param's dtype and shape (torch.optim.SGD's own key), or
  * ``{"step": 0-dim float32, "state1": uint8 (param's shape), "absmax1": float32, "qmap1": float32[256]}``
    (bitsandbytes' 8-bit keys); absmax1 is ``[blocks]`` (flat layout) or ``[rows, blocks per row]`` (per
    row, for params with rows of >= 128 elements; see _layout.MIN_ROW_LENGTH).
Saved state may come in any of these, or as bitsandbytes writes it: ``step`` as an int, keys nested
under ``"__bnb_optimizer_quant_state__"``, and a float32 ``state1`` for 32-bit state. Each param's state
is converted to what this optimizer keeps for it (8-bit or full precision); everything is validated
before the optimizer is touched.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from itertools import chain
from typing import Any, Callable

import torch
from torch import Tensor

from . import ops
from ._checks import validate_group
from ._layout import (EIGHT_BIT, FULL, NONE, StateKind, absmax_shape, gets_8bit_state, per_row, step_counter_device,
                      uses_momentum)
from .quantization import BLOCK_SIZE, absmax_per_element

FORMAT_KEY = "torchsgd8_format_version"
# 2: absmax1 of params with rows of >= 128 elements is per row. Version 1 (flat blocks) still loads: its
# absmax is reshaped where the blocks coincide (rows of whole blocks) and requantized otherwise.
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
BNB_WRAPPED_KEY = "__bnb_optimizer_quant_state__"

# Keys bitsandbytes may store that carry no momentum information for SGD (statistics for clipping).
_BNB_IGNORABLE_KEYS = {"gnorm_vec", "unorm_vec"}
# Group keys torch.optim.SGD / bitsandbytes store that torchsgd8 does not use.
_FOREIGN_GROUP_KEYS = {"foreach", "fused", "differentiable", "betas", "eps"}


class StateDictError(ValueError):
    """A state dict that cannot be loaded; the message names the group or parameter."""


def pack_state_dict(param_groups: list[dict], state: dict) -> dict[str, Any]:
    """torch's state-dict layout (``state`` keyed by each param's position across the groups, groups with
    those positions as ``params``) plus the format version. Values are the optimizer's own, not copies."""
    positions: dict[int, int] = {}
    groups = []
    for group in param_groups:
        packed = {k: v for k, v in group.items() if k != "params"}
        packed["params"] = [positions.setdefault(id(p), len(positions)) for p in group["params"]]
        groups.append(packed)
    packed_state = {(positions[id(p)] if isinstance(p, Tensor) else p): v for p, v in state.items()}
    return {"state": packed_state, "param_groups": groups, FORMAT_KEY: FORMAT_VERSION}


def convert_state_dict(groups: list[dict], state_dict: dict[str, Any],
                       codebook: Callable[[torch.device], Tensor]) -> tuple[list[dict], dict]:
    """Returns (param_groups, state) ready for ``__setstate__`` of the optimizer with these param `groups`,
    or raises StateDictError. 8-bit state gets ``codebook(device)`` as its qmap."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise StateDictError("optimizer state dict must be a dict with 'state' and 'param_groups'")
    version = state_dict.get(FORMAT_KEY)
    if version is not None and (type(version) is not int or version not in _READABLE_VERSIONS):
        raise StateDictError(
            f"state dict has torchsgd8 format version {version!r}; this torchsgd8 reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}"
        )
    saved_groups = state_dict["param_groups"]
    if not isinstance(state_dict["state"], dict):
        raise StateDictError(f"'state' must be a dict keyed by param id, got {type(state_dict['state']).__name__}")
    if not isinstance(saved_groups, (list, tuple)):
        raise StateDictError(f"'param_groups' must be a list of dicts, got {type(saved_groups).__name__}")
    for i, g in enumerate(saved_groups):
        if not isinstance(g, dict):
            raise StateDictError(f"param group {i} must be a dict, got {type(g).__name__}")
        ids = g.get("params")
        # ints from Optimizer.state_dict(); fully-qualified names from torch.distributed.checkpoint
        if not isinstance(ids, (list, tuple)) or not all(_is_param_id(x) for x in ids):
            raise StateDictError(f"param group {i} needs 'params': a list of param ids (ints or names), got {ids!r:.80}")
    saved_ids = list(chain.from_iterable(g["params"] for g in saved_groups))
    if len(set(saved_ids)) != len(saved_ids):
        raise StateDictError("a param id appears more than once in 'param_groups'")
    if len(groups) != len(saved_groups):
        raise StateDictError(
            f"state dict has {len(saved_groups)} param groups, the optimizer has {len(groups)}"
        )
    for i, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise StateDictError(
                f"param group {i} has {len(group['params'])} params, the state dict's has {len(saved['params'])}"
            )

    # deep-copied as torch does, so two optimizers never share a tensor hyperparameter or rounding seed;
    # in one call, so groups that shared one (a default tensor lr) still share its copy
    copies = copy.deepcopy([{k: v for k, v in g.items() if k not in _FOREIGN_GROUP_KEYS and k != "params"}
                            for g in saved_groups])
    new_groups = [_convert_group(group, saved, new, i)
                  for i, (group, saved, new) in enumerate(zip(groups, saved_groups, copies))]
    for group in new_groups:
        try:
            validate_group(group)
        except (ValueError, TypeError) as e:
            raise StateDictError(f"state dict has an invalid param group: {e}") from e

    id_to_param = dict(zip(saved_ids, chain.from_iterable(g["params"] for g in groups)))
    id_to_group = {pid: new_groups[gi] for gi, g in enumerate(saved_groups) for pid in g["params"]}
    id_to_index = {pid: idx for idx, pid in enumerate(saved_ids)}
    unknown = [k for k in state_dict["state"] if not _is_param_id(k) or k not in id_to_param]
    if unknown:
        raise StateDictError(f"state dict has state for unknown param ids {unknown[:5]}")

    state: defaultdict[Tensor, dict] = defaultdict(dict)  # as torch's: params without state get one lazily
    for pid, saved_state in state_dict["state"].items():
        param = id_to_param[pid]
        where = f"param {id_to_index[pid]} (shape {tuple(param.shape)}, {param.dtype})"
        converted = _convert_param_state(codebook, saved_state, param, id_to_group[pid], where)
        if converted:
            state[param] = converted
    return new_groups, state


def _convert_group(group: dict, saved: dict, new: dict, index: int) -> dict:
    """The param group that loading `saved` (whose copy is `new`, without foreign keys and params) into
    `group` gives. Saved hyperparameters win (that is what loading means); precision (optim_bits,
    min_8bit_size) stays this optimizer's, so e.g. a torch.optim.SGD checkpoint loads into SGD8bit as
    8-bit state. Param names are the saved ones, else the group's (as torch's)."""
    if "betas" in saved and "momentum" not in saved:  # bitsandbytes stores (momentum, dampening) as betas
        betas = saved["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise StateDictError(f"param group {index}: 'betas' must be a (momentum, dampening) pair")
        new["momentum"], new["dampening"] = betas
    for key in ("lr", "momentum", "dampening", "weight_decay"):
        if key not in new:
            raise StateDictError(f"param group {index} of the state dict has no '{key}'")
    precision_keys = ("optim_bits", "min_8bit_size", "stochastic_rounding")
    for key in ("nesterov", "maximize") + precision_keys:
        if key in precision_keys or key not in new:
            new[key] = group[key]
    seed = new.get("rounding_seed")
    if seed is not None and not (isinstance(seed, Tensor) and seed.numel() == 1 and seed.dtype == torch.int64
                                 and seed.layout == torch.strided and not seed.is_meta):
        raise StateDictError(f"param group {index}: 'rounding_seed' must be a 1-element int64 tensor")
    if seed is None and "rounding_seed" in group:
        new["rounding_seed"] = group["rounding_seed"].clone()
    elif seed is not None:
        new["rounding_seed"] = seed.reshape(()).cpu()
    lr = group["lr"]
    if isinstance(lr, Tensor) and not isinstance(new["lr"], Tensor):  # keep a tensor lr a tensor (in place)
        new["lr"] = lr.detach().clone().fill_(new["lr"])
    names = new.get("param_names")
    if names is not None and not (isinstance(names, (list, tuple)) and len(names) == len(group["params"])):
        raise StateDictError(f"param group {index}: 'param_names' must be a list of {len(group['params'])} names")
    new["params"] = group["params"]
    if names is None and "param_names" in group:
        new["param_names"] = group["param_names"]
    return new


def _unwrap(saved_state: dict, where: str) -> dict:
    if not isinstance(saved_state, dict):
        raise StateDictError(f"{where}: state must be a dict, got {type(saved_state).__name__}")
    flat = {k: v for k, v in saved_state.items() if k != BNB_WRAPPED_KEY}
    wrapped = saved_state.get(BNB_WRAPPED_KEY, {})
    if not isinstance(wrapped, dict):
        raise StateDictError(f"{where}: '{BNB_WRAPPED_KEY}' must be a dict")
    for k, v in wrapped.items():
        if k in flat:
            raise StateDictError(f"{where}: key '{k}' appears both wrapped and unwrapped")
        flat[k] = v
    return {k: v for k, v in flat.items() if k not in _BNB_IGNORABLE_KEYS}


def _is_param_id(x: Any) -> bool:
    return isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool))


def _names(keys) -> list:
    return sorted(keys, key=repr)  # keys of any type, ordered for stable messages


def _check_tensor(value: Any, where: str, key: str, shape=None, dtype=None, floating=False) -> Tensor:
    if not isinstance(value, Tensor):
        raise StateDictError(f"{where}: '{key}' must be a tensor, got {type(value).__name__}")
    if value.layout != torch.strided or value.is_meta:
        raise StateDictError(f"{where}: '{key}' must be a dense tensor with data, got {value.layout} on {value.device}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise StateDictError(f"{where}: '{key}' has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if dtype is not None and value.dtype != dtype:
        raise StateDictError(f"{where}: '{key}' has dtype {value.dtype}, expected {dtype}")
    if floating and not (value.is_floating_point() or value.is_complex()):
        raise StateDictError(f"{where}: '{key}' must be floating point, got {value.dtype}")
    return value


def _read_step(value: Any, where: str) -> Tensor:
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.layout != torch.strided or value.is_meta:
            raise StateDictError(f"{where}: 'step' must hold one number, got {value.layout} shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise StateDictError(f"{where}: 'step' must be a number >= 0 (and finite), got {value!r}")
    return torch.tensor(float(value), dtype=torch.float32)


def _absmax_shapes(shape: torch.Size) -> set[tuple]:
    """The shapes absmax may have for codes of `shape`: the flat layout's, and for 2+ dims the per-row one's."""
    shapes = {ops.absmax_shape(shape, per_row=False)}
    if len(shape) >= 2:
        shapes.add(ops.absmax_shape(shape, per_row=True))
    return shapes


def _read_momentum(flat: dict, param: Tensor, where: str) -> tuple[StateKind, Any]:
    """Returns (NONE, None), (FULL, buffer tensor) or (EIGHT_BIT, (codes, absmax, qmap, step))."""
    keys = set(flat)
    if not keys or keys == {"step"}:
        return NONE, None
    if "momentum_buffer" in keys:
        extra = keys - {"momentum_buffer"}
        if extra:
            raise StateDictError(f"{where}: unexpected keys {_names(extra)} beside 'momentum_buffer'")
        buf = flat["momentum_buffer"]
        if buf is None:
            return NONE, None
        return FULL, _check_tensor(buf, where, "momentum_buffer", shape=param.shape, floating=True)
    if "state1" not in keys:
        raise StateDictError(f"{where}: no 'momentum_buffer' or 'state1' among keys {_names(keys)}")
    state1 = flat["state1"]
    _check_tensor(state1, where, "state1", shape=param.shape)
    if state1.dtype == torch.uint8:
        missing = {"absmax1", "qmap1"} - keys
        if missing:
            raise StateDictError(f"{where}: 8-bit 'state1' needs {_names(missing)}")
        extra = keys - {"state1", "absmax1", "qmap1", "step"}
        if extra:
            raise StateDictError(f"{where}: unexpected keys {_names(extra)} in 8-bit state")
        absmax = _check_tensor(flat["absmax1"], where, "absmax1", dtype=torch.float32)
        if tuple(absmax.shape) not in _absmax_shapes(param.shape):  # either layout loads
            raise StateDictError(f"{where}: 'absmax1' has shape {tuple(absmax.shape)}, expected "
                                 f"{absmax_shape(param)} (one per 256-element block)")
        qmap = _check_tensor(flat["qmap1"], where, "qmap1", shape=(256,), dtype=torch.float32)
        if not bool((qmap[1:] > qmap[:-1]).all()):
            raise StateDictError(f"{where}: 'qmap1' must be strictly increasing")
        return EIGHT_BIT, (state1, absmax, qmap, _read_step(flat.get("step", 1), where))
    extra = keys - {"state1", "step"}
    if extra:
        raise StateDictError(f"{where}: unexpected keys {_names(extra)} in 32-bit state")
    return FULL, _check_tensor(state1, where, "state1", floating=True)


def _convert_param_state(codebook: Callable[[torch.device], Tensor], saved_state: Any, param: Tensor, group: dict,
                         where: str) -> dict:
    flat = _unwrap(saved_state, where)
    kind, value = _read_momentum(flat, param, where)
    if kind is NONE or not uses_momentum(group["momentum"]):
        return {}
    want_8bit = gets_8bit_state(param, group)
    if kind is FULL:
        buf = value.detach().to(device=param.device)
        if not want_8bit:
            return {"momentum_buffer": buf.to(param.dtype).contiguous().clone()}
        codes, absmax = ops.quantize_blockwise(buf.to(torch.float32), per_row=per_row(param))
        # torch.optim.SGD keeps no step count; bitsandbytes' 32-bit state does: keep it where present
        return _8bit_state(codebook, param, codes, absmax, _read_step(flat.get("step", 1), where))
    codes, absmax, qmap, step = value
    codes, absmax = codes.to(param.device).contiguous(), absmax.to(param.device).contiguous()
    target = absmax_shape(param)
    same_codebook = torch.equal(qmap.to(param.device), codebook(param.device))
    if want_8bit and same_codebook and _same_blocks(param.shape, tuple(absmax.shape), target):
        return _8bit_state(codebook, param, codes.clone(), absmax.reshape(target).clone(), step)
    values = _decode(codes, absmax, qmap.to(param.device))
    if not want_8bit:
        return {"momentum_buffer": values.to(param.dtype)}
    codes, absmax = ops.quantize_blockwise(values, per_row=per_row(param))
    return _8bit_state(codebook, param, codes, absmax, step)


def _same_blocks(shape: torch.Size, saved: tuple, target: tuple) -> bool:
    """Whether two absmax layouts of a param cut the same blocks (the flat and per-row layouts do when
    every row is whole blocks, or there is one row)."""
    if saved == target:
        return True
    return len(shape) >= 1 and (shape[0] <= 1 or math.prod(shape[1:]) % BLOCK_SIZE == 0)


def _decode(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    """qmap[code] * absmax[block of the element], for either absmax layout, with the saved codebook."""
    return qmap[codes.long()] * absmax_per_element(absmax, codes.shape)


def _8bit_state(codebook: Callable[[torch.device], Tensor], param: Tensor, codes: Tensor, absmax: Tensor,
                step: Tensor) -> dict:
    return {"step": step.to(step_counter_device(param)), "state1": codes, "absmax1": absmax,
            "qmap1": codebook(param.device)}



# ---- export: torchsgd8 state dicts in torch.optim.SGD's and bitsandbytes' formats ---------------------------

# Group keys of torchsgd8's own, which neither torch.optim.SGD nor bitsandbytes has.
_OWN_GROUP_KEYS = {"optim_bits", "min_8bit_size", "stochastic_rounding", "rounding_seed"}
# torch.optim.SGD's hyperparameters (bitsandbytes keeps lr and weight_decay, and momentum and dampening
# as its `betas`).
_TORCH_SGD_HYPERPARAMETERS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


def to_torch_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A torchsgd8 state dict (``opt.state_dict()``) in torch.optim.SGD's format, for
    ``torch.optim.SGD.load_state_dict``: 8-bit momentum decoded into a float32 ``momentum_buffer`` (torch
    casts it to the param's dtype when loading), full-precision buffers as they are, and the param groups
    without torchsgd8's own keys (``optim_bits``, ``min_8bit_size``, ``stochastic_rounding``,
    ``rounding_seed``); a tensor momentum becomes a float. Shares no tensor with `state_dict`.
    """
    groups, state = _read_own_state_dict(state_dict)
    new_groups = copy.deepcopy([{k: v for k, v in g.items() if k not in _OWN_GROUP_KEYS} for g in groups])
    for group in new_groups:
        group["momentum"] = _as_number(group["momentum"])
    new_state = {}
    for pid, saved in state.items():
        kind, value = _read_own_param_state(saved, f"param {pid!r}")
        if kind is NONE:
            new_state[pid] = {}
        else:
            new_state[pid] = {"momentum_buffer": value.clone() if kind is FULL else _decode(*value[:3])}
    return {"state": new_state, "param_groups": new_groups}


def to_bitsandbytes_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A torchsgd8 state dict (``opt.state_dict()``) in the format of bitsandbytes' SGD, SGD8bit and
    SGD32bit (0.50): groups of ``lr``, ``betas`` = (momentum, dampening), ``eps``, ``weight_decay`` (as
    numbers), and per param ``step`` (an int) and, under ``"__bnb_optimizer_quant_state__"``, ``state1``
    with ``absmax1`` and ``qmap1`` for 8-bit state or a float32 ``state1`` for full-precision state.

    8-bit codes are kept where bitsandbytes' blocks (of the flattened tensor) are torchsgd8's: flat
    layouts, and per-row layouts whose rows are whole 256-element blocks; other per-row state is decoded
    and requantized in bitsandbytes' blocks (within quantization error). Params with full-precision state
    get step 1 (torchsgd8 counts no steps for them; bitsandbytes' SGD reads the count only to tell a
    first step). Raises StateDictError for what bitsandbytes' SGD would silently compute differently:
    ``nesterov``, ``maximize`` or a nonzero ``dampening`` (its kernels ignore them), and complex params.
    Shares no tensor with `state_dict`.
    """
    groups, state = _read_own_state_dict(state_dict)
    new_groups = []
    for i, group in enumerate(groups):
        for key in ("nesterov", "maximize"):
            if group.get(key):
                raise StateDictError(f"param group {i} has {key}=True, which bitsandbytes' SGD does not implement")
        if _as_number(group["dampening"]) != 0:
            raise StateDictError(f"param group {i} has dampening {group['dampening']}, which bitsandbytes' SGD "
                                 "does not implement")
        new = {"lr": _as_number(group["lr"]), "betas": (_as_number(group["momentum"]), _as_number(group["dampening"])),
               "eps": 0.0, "weight_decay": _as_number(group["weight_decay"])}
        others = {k: v for k, v in group.items()
                  if k not in _OWN_GROUP_KEYS and k not in _TORCH_SGD_HYPERPARAMETERS and k != "params"}
        new.update(copy.deepcopy(others))
        new["params"] = list(group["params"])
        new_groups.append(new)
    new_state = {}
    for pid, saved in state.items():
        where = f"param {pid!r}"
        kind, value = _read_own_param_state(saved, where)
        if kind is NONE:
            new_state[pid] = {}
        elif kind is FULL:
            if value.is_complex():
                raise StateDictError(f"{where}: complex state, which bitsandbytes' SGD does not implement")
            state1 = value.float() if value.dtype in (torch.bfloat16, torch.float16) else value.clone()
            new_state[pid] = {"step": 1, BNB_WRAPPED_KEY: {"state1": state1}}
        else:
            codes, absmax, qmap, step = value
            codes, absmax = _flat_blocks(codes, absmax, qmap)
            new_state[pid] = {"step": int(step.item()),
                              BNB_WRAPPED_KEY: {"state1": codes, "qmap1": qmap.clone(), "absmax1": absmax}}
    return {"state": new_state, "param_groups": new_groups}


def _read_own_state_dict(state_dict: Any) -> tuple[list[dict], dict]:
    """(param groups, state) of a torchsgd8 state dict, or StateDictError."""
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
        raise StateDictError("optimizer state dict must be a dict with 'state' and 'param_groups'")
    version = state_dict.get(FORMAT_KEY)
    if type(version) is not int or version not in _READABLE_VERSIONS:
        raise StateDictError(f"not a torchsgd8 state dict (format version {version!r}; this torchsgd8 reads "
                             f"versions {', '.join(map(str, _READABLE_VERSIONS))})")
    groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(state, dict) or not isinstance(groups, (list, tuple)) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), (list, tuple)) for g in groups):
        raise StateDictError("'state' must be a dict and 'param_groups' a list of dicts with 'params'")
    for i, group in enumerate(groups):
        missing = [key for key in ("lr", "momentum", "dampening", "weight_decay") if key not in group]
        if missing:
            raise StateDictError(f"param group {i} has no {missing}")
    return list(groups), state


def _read_own_param_state(saved: Any, where: str) -> tuple[StateKind, Any]:
    """A param's torchsgd8 state as _read_momentum reads it: (NONE, None), (FULL, buffer) or
    (EIGHT_BIT, (codes, absmax, qmap, step))."""
    if not isinstance(saved, dict):
        raise StateDictError(f"{where}: state must be a dict, got {type(saved).__name__}")
    keys = set(saved)
    if keys not in (set(), {"momentum_buffer"}, {"step", "state1", "absmax1", "qmap1"}):
        raise StateDictError(f"{where}: not torchsgd8 state (keys {_names(keys)})")
    if not keys:
        return NONE, None
    if "momentum_buffer" in keys:
        buf = saved["momentum_buffer"]
        return (NONE, None) if buf is None else (FULL, _check_tensor(buf, where, "momentum_buffer", floating=True))
    codes = _check_tensor(saved["state1"], where, "state1", dtype=torch.uint8)
    absmax = _check_tensor(saved["absmax1"], where, "absmax1", dtype=torch.float32)
    if tuple(absmax.shape) not in _absmax_shapes(codes.shape):
        raise StateDictError(f"{where}: 'absmax1' has shape {tuple(absmax.shape)}, which fits no block layout "
                             f"of 'state1' {tuple(codes.shape)}")
    qmap = _check_tensor(saved["qmap1"], where, "qmap1", shape=(256,), dtype=torch.float32)
    return EIGHT_BIT, (codes, absmax, qmap, _read_step(saved["step"], where))


def _flat_blocks(codes: Tensor, absmax: Tensor, qmap: Tensor) -> tuple[Tensor, Tensor]:
    """8-bit state in bitsandbytes' blocks (of the flattened tensor): new tensors."""
    if _same_blocks(codes.shape, tuple(absmax.shape), ops.absmax_shape(codes.shape, per_row=False)):
        return codes.clone(), absmax.reshape(-1).clone()
    return ops.quantize_blockwise(_decode(codes, absmax, qmap), per_row=False)


def _as_number(value: Any) -> Any:
    """A Python number for a tensor or numpy hyperparameter; Python numbers as they are."""
    return value if type(value) in (int, float) else float(value)
