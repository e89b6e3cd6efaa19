"""Print the C++ tables of csrc/quant.h: the signed dynamic map and its rounding thresholds.

Run: .venv/bin/python tools/gen_quant_tables.py > /tmp/tables.h  (then paste into csrc/quant.h)

The map is bitsandbytes' create_dynamic_map(signed=True), rebuilt by torchsgd8.quantization (tests check
it equals bitsandbytes' bit for bit). Threshold i separates code i from code i+1: the code of a float x is
the number of thresholds strictly below x. Ties (x exactly on a midpoint) go to the code nearer zero.
"""
import numpy as np

from torchsgd8.quantization import signed_dynamic_map, rounding_thresholds


def c_floats(values):
    items = [float(v).hex() + "f" for v in values]
    return "\n".join("    " + ", ".join(items[i : i + 4]) + "," for i in range(0, len(items), 4))


qmap = signed_dynamic_map().numpy()
thresholds = rounding_thresholds(qmap)
assert np.all(np.diff(thresholds) > 0)
print("inline constexpr float kSignedDynamicMap[256] = {\n" + c_floats(qmap) + "\n};")
print("inline constexpr float kCodeThresholds[255] = {\n" + c_floats(thresholds) + "\n};")
