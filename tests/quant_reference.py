"""The kernels' nearest-code rules in PyTorch, and a brute-force one, for the tests to check the kernels
(and each other) against. The tables come from tools/quant_tables.py, as csrc/quant.h's do."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from torchsgd8.quantization import ZERO_CODE, signed_dynamic_map


def _load_quant_tables():
    """tools/quant_tables.py, loaded from its file (tools/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "tools" / "quant_tables.py"
    spec = importlib.util.spec_from_file_location("quant_tables", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _load_quant_tables()


def nearest_code(x: torch.Tensor) -> torch.Tensor:
    """The kernels' bucket lookup (csrc/quant.h), in PyTorch: uint8 codes of float32 ``x`` (already divided by absmax)."""
    thresholds = tables.positive_thresholds(signed_dynamic_map().numpy())
    table = torch.from_numpy(tables.bucket_table(thresholds)).long()
    bits = x.to(torch.float32).view(torch.int32).long() & 0x7FFFFFFF  # |x|, also for -0.0 and NaN
    entry = table[((bits >> tables.BUCKET_SHIFT) - tables.bucket_offset()).clamp(0, len(table) - 1)]
    c = (entry >> tables.BUCKET_SHIFT) + ((bits & tables.LOW_MASK) > (entry & tables.LOW_MASK)).long()
    return torch.where(x < 0, ZERO_CODE - c.clamp(max=127), ZERO_CODE + c).to(torch.uint8)


def nearest_code_reference(x: torch.Tensor, qmap: torch.Tensor | None = None) -> torch.Tensor:
    """Brute force: argmin over all 256 codes of |x - qmap[c]| in float64, ties to the smaller magnitude
    (memory O(256 * numel))."""
    if qmap is None:
        qmap = signed_dynamic_map()
    xs = x.detach().reshape(-1, 1).to(torch.float64)
    q = qmap.to(torch.float64).reshape(1, -1)
    dist = (xs - q).abs()
    best = dist.min(dim=1, keepdim=True).values
    # among the codes at the minimal distance, pick the one of smallest magnitude
    candidates = torch.where(dist == best, q.abs().expand_as(dist), torch.full_like(dist, float("inf")))
    return candidates.argmin(dim=1).to(torch.uint8).reshape(x.shape)


def nearest_code_segments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The AVX-512 kernels' fast path, in PyTorch: (codes, near) for float32 ``x`` (already
    divided by a finite absmax, so |x| <= 1); where ``near`` is set the kernels use nearest_code instead."""
    thresholds = tables.positive_thresholds(signed_dynamic_map().numpy())
    below, split = (torch.from_numpy(t.astype(np.int64)) for t in tables.segment_exponent_tables(thresholds))
    slope, offset, _ = (torch.from_numpy(t).double() for t in tables.segment_linear_tables())
    bits = (x.to(torch.float32).view(torch.int32).long() & 0x7FFFFFFF).clamp(min=tables.SEGMENT_EXPONENT_BASE << 23)
    index = (bits >> 24) & 15
    segment = below[index] + (bits > split[index]).long()
    magnitude = bits.to(torch.int32).view(torch.float32).double()
    fixed_offset = (offset * tables.COUNT_UNIT + tables.NEAR_UNITS).float().double()[segment]  # a float32 table
    # one rounding each, like the FMAs (the products of two float32 are exact in float64)
    estimate = (magnitude * (slope * tables.COUNT_UNIT)[segment] + fixed_offset).float()
    clamp = (fixed_offset * tables.CLAMP_SCALE + tables.CLAMP_BIAS).float()
    fixed = torch.minimum(estimate, clamp).double().round().long()  # round half to even, as the kernels
    near = (fixed & (tables.COUNT_UNIT - 2 * tables.NEAR_UNITS)) == 0
    count = fixed // tables.COUNT_UNIT
    negative = x.to(torch.float32).view(torch.int32) < 0  # the sign bit: -0.0 gives the zero code either way
    codes = torch.where(negative, (ZERO_CODE - count).clamp(min=0), ZERO_CODE + count).to(torch.uint8)
    return codes, near
