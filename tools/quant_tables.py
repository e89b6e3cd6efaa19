"""How csrc/quant.h's nearest-code tables follow from the codebook (torchsgd8.quantization): the derivation
that tools/gen_quant_tables.py prints as C++ and tests/quant_reference.py evaluates in PyTorch.

Each table is computed from the codebook's float32 values with exact float64 / bit-pattern arithmetic;
the assertions state the facts the kernels rely on (at most one threshold per bucket, at most one segment
boundary per pair of binades).
"""
from __future__ import annotations

import numpy as np

# Lookup of the nearest code (see csrc/quant.h): |x|'s float bits >> BUCKET_SHIFT (the exponent and the
# top 6 mantissa bits) name a bucket; buckets below 2**LOWEST_BUCKET_EXPONENT are merged into bucket 0.
BUCKET_SHIFT = 17
LOWEST_BUCKET_EXPONENT = -23


def positive_thresholds(qmap) -> np.ndarray:
    """float32 t[j] (j = 0..127) such that |x| > t[j] exactly when |x| lies beyond the midpoint between
    positive codes j-1 and j (code -1 meaning 0.0), plus a +inf sentinel at index 128.

    Midpoints m of neighbouring float32 codes are exact in float64, and for float32 a, ``a > m`` equals
    ``a > round_down_f32(m)``; a tie (a == m) stays on the smaller code. The map is symmetric apart from
    +1.0, so the same thresholds serve negative values: ties always go towards zero.
    """
    qmap = np.asarray(qmap, dtype=np.float32)
    positive = np.concatenate([[0.0], qmap[qmap > 0]]).astype(np.float64)
    assert len(positive) == 129 and np.array_equal(-qmap[:127][::-1], qmap[128:255])
    mids = (positive[:-1] + positive[1:]) / 2.0
    out = mids.astype(np.float32)  # round to nearest, then step down where that rounded up
    up = out.astype(np.float64) > mids
    out[up] = np.nextafter(out[up], np.float32(-np.inf))
    return np.concatenate([out, [np.float32(np.inf)]]).astype(np.float32)


def bucket_offset() -> int:
    return int(np.float32(2.0**LOWEST_BUCKET_EXPONENT).view(np.uint32)) >> BUCKET_SHIFT


def bucket_base_table(thresholds: np.ndarray) -> np.ndarray:
    """base[b] = number of thresholds below the smallest float of bucket b, for buckets up to 1.0."""
    finite = thresholds[:-1]
    last = int(np.float32(1.0).view(np.uint32)) >> BUCKET_SHIFT
    first = bucket_offset()
    base = []
    for b in range(first, last + 1):
        lo = np.uint32(b << BUCKET_SHIFT).view(np.float32) if b > first else np.float32(0.0)
        hi = np.uint32((b + 1) << BUCKET_SHIFT).view(np.float32)
        inside = np.count_nonzero((finite >= lo) & (finite < hi))
        assert inside <= 1, f"bucket {b} holds {inside} thresholds; use more mantissa bits"
        base.append(np.count_nonzero(finite < lo))
    return np.asarray(base, dtype=np.int32)


LOW_MASK = (1 << BUCKET_SHIFT) - 1


def bucket_table(thresholds: np.ndarray) -> np.ndarray:
    """One int32 per bucket: ``base << BUCKET_SHIFT | low``, where ``low`` is the low BUCKET_SHIFT bits of
    the bucket's threshold (the bucket fixes the other bits), or LOW_MASK when the bucket holds none.

    For |x| in the bucket, |x| > threshold exactly when low_bits(|x|) > low (non-negative floats order as
    their bit patterns), so one table read (one gather for 8 lanes) gives the code.
    """
    base = bucket_base_table(thresholds)
    first = bucket_offset()
    entries = []
    for i, b in enumerate(base):
        t_bits = int(thresholds[b].view(np.uint32)) if b < len(thresholds) - 1 else None
        inside = t_bits is not None and (t_bits >> BUCKET_SHIFT) == first + i and i > 0
        low = t_bits & LOW_MASK if inside else LOW_MASK
        entries.append((int(b) << BUCKET_SHIFT) | low)
    return np.asarray(entries, dtype=np.int32)


# ---- the segment form of the nearest-code rule (the AVX-512 kernels; see csrc/quant.h) ----
# The positive codes come in 7 decades of evenly spaced values, so inside decade k the count of thresholds
# below |x| is a linear function of |x| rounded down. A "segment" is a run of codes between two decade
# boundaries (the thresholds 0|P1, P1|P2, P3|P4, ..., P127|1.0); segment s covers magnitude counts
# [first, last]. |x|'s exponent E (96 <= E <= 127; tables indexed by bits 24-27 of |x|, i.e. per pair of
# binades; smaller magnitudes count as 2**-31) gives the segment up to one boundary inside the pair, then
# one compare settles it. The count is then |x| * slope + offset rounded down and clamped to the segment's
# last count, exact except within SEGMENT_NEAR of an integer, where the kernels fall back to the bucket
# lookup. The kernels compute it in fixed point: 2**16 (COUNT_UNIT) times the estimate, plus NEAR_UNITS,
# rounded to an integer, holds the count in bits 16-23 and is "near" when its low 16 bits are below
# 2 * NEAR_UNITS.
SEGMENT_EXPONENT_BASE = 96  # magnitudes below 2**-31 are all in segment 0 (code of 0.0)
SEGMENT_NEAR = 2.0**-14  # 8x the largest distance from an integer where trunc is wrong (7.6e-6)
COUNT_UNIT = 2**16
NEAR_UNITS = int(SEGMENT_NEAR * COUNT_UNIT)  # 4
# The clamp to the last count of a decade segment (offset 8/9 * 2**k, last count 2**(k+1) - 1), from its
# fixed-point offset: CLAMP_SCALE * offset + CLAMP_BIAS = (last + 1/2) * COUNT_UNIT + NEAR_UNITS.
CLAMP_SCALE = 2.25
CLAMP_BIAS = -(COUNT_UNIT // 2 - NEAR_UNITS) - CLAMP_SCALE * NEAR_UNITS


def segment_boundaries(thresholds: np.ndarray) -> np.ndarray:
    """The 8 thresholds between segments, as float32 bit patterns (uint32)."""
    return thresholds[[0, 1, 3, 7, 15, 31, 63, 127]].view(np.uint32)


def segment_exponent_tables(thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(below, split), each 16 int32 indexed by (E - 96) // 2 for |x|'s exponent E, i.e. by bits 24-27 of
    |x|: below = segments wholly beneath the two binades [2**(E-127), 2**(E-125)) of that index; split =
    the bits of the one boundary inside them (0x7fffffff: none; the boundaries lie a factor ~10 apart, so
    two binades never hold two), and the segment of |x| is below + (bits(|x|) > split). E = 255 (NaN, inf)
    reads index 15, the binades of 1.0."""
    bounds = segment_boundaries(thresholds).astype(np.int64)
    assert bounds[0] >= SEGMENT_EXPONENT_BASE << 23
    below, split = [], []
    for index in range(16):
        lo, hi = (SEGMENT_EXPONENT_BASE + 2 * index) << 23, (SEGMENT_EXPONENT_BASE + 2 * index + 2) << 23
        inside = bounds[(bounds >= lo) & (bounds < hi)]
        assert len(inside) <= 1, f"binades {2 * index}, {2 * index + 1} hold {len(inside)} segment boundaries"
        below.append(np.count_nonzero(bounds < lo))
        split.append(inside[0] if len(inside) else 0x7FFFFFFF)
    return np.asarray(below, dtype=np.int32), np.asarray(split, dtype=np.int64).astype(np.int32)


def segment_linear_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slope, offset, last), 16 entries indexed by segment (9 used): count = min(trunc(|x| * slope +
    offset), last). Segments without thresholds inside (0.0, the first code, 1.0) have slope 0 and an
    offset half-way between integers, so they never look "near" one."""
    slope = np.zeros(16, dtype=np.float32)
    offset = np.zeros(16, dtype=np.float32)
    last = np.zeros(16, dtype=np.int32)
    offset[0], offset[1], offset[8] = 0.5, 1.5, 128.5
    last[0], last[1], last[8] = 0, 1, 128
    for k in range(1, 7):
        # decade k: thresholds at 10**(k-6) * (0.1 + j * 0.9 / 2**k), j = 1 .. 2**k - 1 (edges of linspace)
        n = 2**k
        slope[k + 1] = np.float32(10.0 ** (6 - k) * n / 0.9)
        offset[k + 1] = np.float32(n - 0.1 * n / 0.9)
        last[k + 1] = 2 * n - 1
    return slope, offset, last
