"""benchmarks/bench_step.py runs end to end in a tiny configuration and writes the documented JSON."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"
METHODS = ["torch_foreach", "torch_fused", "torchsgd8_fp32", "torchsgd8_8bit"]
METHOD_FIELDS = {
    "method", "error", "median_ms", "min_ms", "times_ms", "warmup_ms", "ideal_bytes", "ideal_bytes_per_param",
    "gbps", "x_roofline", "x_fused", "state_bytes_per_param", "compile_s",
}
MACHINE_FIELDS = {
    "cpu_model", "cpu_count", "torch_threads", "torch_version", "torchsgd8_version", "torchsgd8_cpu_isa",
    "torchsgd8_cpu_prefetch", "torchsgd8_cpu_gather", "bitsandbytes_version", "date",
}


def test_bench_step_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--sizes", "64K", "--reps", "2", "--warmup", "1",
           "--layouts", "mixed,single", "--methods", ",".join(METHODS), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x roofline" in proc.stdout

    report = json.loads(out.read_text())
    assert MACHINE_FIELDS <= report["machine"].keys()
    assert report["settings"]["sizes"] == [65536]
    assert [(c["size"], c["layout"]) for c in report["results"]] == [(65536, "mixed"), (65536, "single")]
    for config in report["results"]:
        assert sum(math.prod(shape) for shape in config["shapes"]) == 65536
        assert config["axpy"]["median_ms"] > 0
        assert [row["method"] for row in config["methods"]] == METHODS
        rows = {row["method"]: row for row in config["methods"]}
        for row in rows.values():
            assert row.keys() == METHOD_FIELDS
            assert row["error"] is None
            assert len(row["times_ms"]) == 2 and row["median_ms"] > 0 and row["compile_s"] is None
        assert rows["torch_fused"]["x_fused"] == 1.0
        assert rows["torchsgd8_fp32"]["ideal_bytes_per_param"] == 20
        assert rows["torchsgd8_fp32"]["state_bytes_per_param"] == 4
        # 8-bit: 1 B codes + 4 B absmax per 256 elements (+ small fp32 vectors and the codebook)
        assert 1.0 < rows["torchsgd8_8bit"]["state_bytes_per_param"] < 1.2
        assert 14 < rows["torchsgd8_8bit"]["ideal_bytes_per_param"] < 16


@pytest.mark.parametrize("prefetch, gather", [("0", "1"), ("1", "0")])
def test_bench_step_runs_the_kernel_settings_it_is_given(tmp_path, prefetch, gather):
    """--isa, --prefetch and --gather re-run the benchmark with TORCHSGD8_CPU_ISA / _PREFETCH / _GATHER set."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--sizes", "64K", "--reps", "1", "--warmup", "1", "--layouts", "single",
           "--methods", "torch_fused,torchsgd8_8bit", "--isa", "default", "--prefetch", prefetch, "--gather", gather,
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    on_off = {"0": "off", "1": "on"}
    assert f"(DEFAULT, prefetch {on_off[prefetch]}, gather {on_off[gather]})" in proc.stdout
    machine = json.loads(out.read_text())["machine"]
    assert machine["torchsgd8_cpu_isa"] == "DEFAULT"
    assert machine["torchsgd8_cpu_prefetch"] is (prefetch == "1")
    assert machine["torchsgd8_cpu_gather"] is (gather == "1")


def test_bench_step_with_bf16_params_counts_their_bytes(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--sizes", "64K", "--reps", "1", "--warmup", "1", "--layouts", "single",
           "--methods", "torch_fused,torchsgd8_fp32,torchsgd8_8bit", "--dtype", "bfloat16", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "64K bfloat16 params" in proc.stdout
    report = json.loads(out.read_text())
    assert report["settings"]["dtype"] == "bfloat16"
    (config,) = report["results"]
    assert config["dtype"] == "bfloat16"
    rows = {row["method"]: row for row in config["methods"]}
    assert all(row["error"] is None for row in rows.values())
    # full-precision momentum in the param's dtype: read p, g, buf and write p, buf, 2 B each
    assert rows["torch_fused"]["ideal_bytes_per_param"] == rows["torchsgd8_fp32"]["ideal_bytes_per_param"] == 10
    assert rows["torchsgd8_fp32"]["state_bytes_per_param"] == 2
    # 8-bit: 3 * 2 B of params and grads + 2 B of codes + absmax
    assert 8 < rows["torchsgd8_8bit"]["ideal_bytes_per_param"] < 8.1


def test_layouts_hold_exactly_the_total():
    """Every layout's tensors add up to the size asked for; `deep` is many small tensors."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench_step
    finally:
        sys.path.remove(str(BENCH.parent))
    for total in (65536, 2**20, 16 * 2**20):
        for layout in bench_step.LAYOUTS:
            assert sum(math.prod(s) for s in bench_step.layout_shapes(layout, total)) == total, (layout, total)
    deep = bench_step.layout_shapes("deep", 16 * 2**20)
    assert len(deep) == 855 and max(math.prod(s) for s in deep[1:]) == 4 * 128 * 128
    assert bench_step.layout_shapes("deep", 65536) == [(65536,)]  # too small for one block
