"""Print the C++ tables of csrc/quant.h: the signed dynamic map and its nearest-code lookup tables.

Run: .venv/bin/python tools/gen_quant_tables.py > /tmp/tables.h  (then paste into csrc/quant.h)

The map is bitsandbytes' create_dynamic_map(signed=True), rebuilt by torchsgd8.quantization (tests check
it equals bitsandbytes' bit for bit). The map is symmetric except for +1.0, so codes are found from |x|:
c(|x|) = number of positive thresholds below |x|, and code = 127 + c (x >= 0) or 127 - min(c, 127).
c is found without a search: the top bits of |x| (exponent and 6 mantissa bits) index a bucket, every
bucket holds at most one threshold (the derivation asserts it), and kBucketTable[bucket] packs the count of
thresholds below the bucket with the low bits of the one inside it: c = base + (low(|x|) > low).
The kSegment* tables serve the AVX-512 kernels, which find c by arithmetic. The derivation of every table
is tools/quant_tables.py.
"""
import numpy as np
from quant_tables import (
    BUCKET_SHIFT,
    CLAMP_BIAS,
    CLAMP_SCALE,
    COUNT_UNIT,
    NEAR_UNITS,
    SEGMENT_EXPONENT_BASE,
    SEGMENT_NEAR,
    bucket_offset,
    bucket_table,
    positive_thresholds,
    segment_exponent_tables,
    segment_linear_tables,
)

from torchsgd8.quantization import signed_dynamic_map


def c_floats(values):
    items = [float(v).hex() + "f" if np.isfinite(v) else "INFINITY" for v in values]
    return "\n".join("    " + ", ".join(items[i : i + 4]) + "," for i in range(0, len(items), 4))


def c_ints(values):
    items = [str(int(v)) for v in values]
    return "\n".join("    " + ", ".join(items[i : i + 16]) + "," for i in range(0, len(items), 16))


qmap = signed_dynamic_map().numpy()
thresholds = positive_thresholds(qmap)
table = bucket_table(thresholds)
print("inline constexpr float kSignedDynamicMap[256] = {\n" + c_floats(qmap) + "\n};")
print(f"constexpr int kBucketShift = {BUCKET_SHIFT};")
print(f"constexpr int kBucketOffset = {bucket_offset()};")
print(f"constexpr int kNumBuckets = {len(table)};")
print("// base << kBucketShift | low bits of the bucket's threshold (all ones: none in the bucket)")
print(f"inline constexpr int32_t kBucketTable[{len(table)}] = {{\n" + c_ints(table) + "\n};")

below, split = segment_exponent_tables(thresholds)
slope, offset, last = segment_linear_tables()
print(f"constexpr int kSegmentExponentBase = {SEGMENT_EXPONENT_BASE};")
print(f"constexpr float kSegmentNear = {float(SEGMENT_NEAR).hex()}f;")
print("// indexed by bits 24-27 of |x| (pairs of binades from kSegmentExponentBase)")
print("inline constexpr int32_t kSegmentBelow[16] = {\n" + c_ints(below) + "\n};")
print("inline constexpr int32_t kSegmentSplit[16] = {\n" + c_ints(split) + "\n};")
print("// indexed by segment")
print("inline constexpr float kSegmentSlope[16] = {\n" + c_floats(slope) + "\n};")
print("inline constexpr float kSegmentOffset[16] = {\n" + c_floats(offset) + "\n};")
print("inline constexpr int32_t kSegmentLast[16] = {\n" + c_ints(last) + "\n};")
print("// the AVX-512 kernels' fixed-point form (see tools/quant_tables.py)")
print(f"constexpr int32_t kCountUnit = {COUNT_UNIT};")
print(f"constexpr int32_t kNearUnits = {NEAR_UNITS};")
print(f"constexpr float kClampScale = {float(CLAMP_SCALE).hex()}f;")
print(f"constexpr float kClampBias = {float(CLAMP_BIAS).hex()}f;")
