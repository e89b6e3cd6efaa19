"""benchmarks/bench_step.py runs end to end in a tiny configuration and writes the documented JSON; its CUDA mode
checks its arguments, and refuses cleanly where there is no GPU; tools/gpu_check.sh parses."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_step.py"
GPU_CHECK = ROOT / "tools" / "gpu_check.sh"
SLOW = pytest.mark.slow
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
    assert report["settings"]["device"] == "cpu" and report["settings"]["steps_per_rep"] == 1
    assert report["settings"]["configs"] == [[65536, "mixed"], [65536, "single"]]
    assert report["skipped_configs"] == []
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


def _bench_step():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench_step
    finally:
        sys.path.remove(str(BENCH.parent))
    return bench_step


def test_layouts_hold_exactly_the_total():
    """Every layout's tensors add up to the size asked for; `deep` is many small tensors."""
    bench_step = _bench_step()
    for total in (65536, 2**20, 16 * 2**20):
        for layout in bench_step.LAYOUTS:
            assert sum(math.prod(s) for s in bench_step.layout_shapes(layout, total)) == total, (layout, total)
    deep = bench_step.layout_shapes("deep", 16 * 2**20)
    assert len(deep) == 855 and max(math.prod(s) for s in deep[1:]) == 4 * 128 * 128
    assert bench_step.layout_shapes("deep", 65536) == [(65536,)]  # too small for one block


# ---- --device cuda ---------------------------------------------------------------------------------------------

CPU_DEFAULT_METHODS = ["torch_forloop", "torch_foreach", "torch_fused", "torch_compiled", "torchsgd8_fp32",
                       "torchsgd8_8bit", "torchsgd8_fp32_compiled", "torchsgd8_8bit_compiled"]
BNB_METHODS = ["bnb_sgd32bit", "bnb_sgd8bit"]


def _parse_error(bench_step, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        bench_step.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cpu_defaults_are_unchanged_by_the_cuda_mode():
    bench_step = _bench_step()
    args = bench_step.parse_args([])
    bnb = BNB_METHODS if bench_step.bnb is not None else []
    assert args.device == "cpu" and args.steps_per_rep == 1
    assert args.methods == CPU_DEFAULT_METHODS + bnb
    assert args.configs == [(size, layout) for size in (2**20, 16 * 2**20, 64 * 2**20) for layout in ("mixed", "single")]
    # on the GPU: CUDA graphs too, no for-loop (one launch per tensor and op)
    assert bench_step.available_methods("cuda") == CPU_DEFAULT_METHODS[1:] + [
        "torchsgd8_fp32_cudagraph", "torchsgd8_8bit_cudagraph"] + bnb


def test_configs_run_in_the_order_given():
    bench_step = _bench_step()
    args = bench_step.parse_args(["--configs", "64M:single,1M:mixed,64K:single"])
    assert args.configs == [(64 * 2**20, "single"), (2**20, "mixed"), (65536, "single")]
    assert args.sizes == [64 * 2**20, 2**20, 65536] and args.layouts == ["single", "mixed"]


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda", "--threads", "2"], "--threads: CPU-only"),
    (["--device", "cuda", "--isa", "avx2", "--check-threads"], "--isa, --check-threads: CPU-only"),
    (["--device", "cuda", "--memory-check"], "--memory-check: CPU-only"),
    (["--methods", "torchsgd8_8bit_cudagraph"], "torchsgd8_8bit_cudagraph: CUDA graphs, only with --device cuda"),
    (["--steps-per-rep", "5"], "--steps-per-rep: only with --device cuda"),
    (["--configs", "64K:single", "--sizes", "1M"], "--configs replaces --sizes and --layouts"),
    (["--configs", "64K:wide"], "expected SIZE:LAYOUT"),
], ids=["threads", "isa-check-threads", "memory-check", "cudagraph-on-cpu", "steps-per-rep-on-cpu",
        "configs-and-sizes", "bad-layout"])
def test_options_for_the_other_device_are_refused(argv, message, capsys):
    assert message in _parse_error(_bench_step(), argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_mode_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--device", "cuda", "--configs", "64K:single", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--device cuda: no CUDA device" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_time_budget_skips_the_configs_it_leaves_no_time_for(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--configs", "64K:single,64K:mixed", "--reps", "1", "--warmup", "1",
           "--methods", "torch_fused", "--time-budget", "0", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["results"] == []
    assert report["skipped_configs"] == [[65536, "single"], [65536, "mixed"]]
    assert "skipped, past the time budget of 0 s" in proc.stdout


def _cuda_config(size: int) -> dict:
    """A --device cuda result as summarize() writes it (times made up)."""
    def row(method, median_ms, x_roofline, **extra):
        return dict(method=method, error=None, note=None, median_ms=median_ms, min_ms=median_ms, gbps=1000.0,
                    x_roofline=x_roofline, x_fused=median_ms / 0.5, state_bytes_per_param=1.0, compile_s=None,
                    **extra)
    return {"size": size, "dtype": "float32", "layout": "single", "n_tensors": 1,
            "copy": {"median_ms": 0.2, "gbps": 3000.0, "times_ms": [0.2]},
            "methods": [row("torch_fused", 0.5, 1.3), row("torchsgd8_8bit", 0.4, 1.1),
                        row("torchsgd8_8bit_compiled", 0.45, 1.25),
                        dict(row("torchsgd8_8bit_cudagraph", 0.41, 1.12), note="CUDA graphs not used (1 graph(s) "
                             "skipped): skipping cudagraphs due to cpu device"),
                        dict(method="bnb_sgd8bit", error="RuntimeError: no kernel", note=None)]}


def test_cuda_table_scores_the_8bit_step_against_its_targets(capsys):
    bench_step = _bench_step()
    config = _cuda_config(64 * 2**20)
    bench_step.print_table(config, threads=16, device="cuda", steps_per_rep=10)
    out = capsys.readouterr().out
    assert "10 steps per timing; copy roofline 0.200 ms = 3000.0 GB/s" in out
    assert "% copy" in out.splitlines()[2]
    assert "note: CUDA graphs not used (1 graph(s) skipped): skipping cudagraphs due to cpu device" in out
    assert "bnb_sgd8bit              failed: RuntimeError: no kernel" in out
    lines = bench_step.gpu_target_lines(config)
    assert lines == [
        "target torchsgd8_8bit: 90.9 % of copy bandwidth (met, >= 85 %); 0.80x torch_fused's time (met, < 1); "
        "bnb_sgd8bit not measured",
        "target torchsgd8_8bit_compiled: 80.0 % of copy bandwidth (MISSED, >= 85 %); 0.90x torch_fused's time "
        "(met, < 1); bnb_sgd8bit not measured",
        "target torchsgd8_8bit_cudagraph: 89.3 % of copy bandwidth (met, >= 85 %); 0.82x torch_fused's time "
        "(met, < 1); bnb_sgd8bit not measured",
    ]
    assert all(line in out for line in lines)
    assert bench_step.gpu_target_lines(_cuda_config(16 * 2**20)) == []  # the targets hold from 64M params on


def test_cuda_summary_names_its_copy_roofline_and_notes():
    """summarize() for --device cuda, fed CPU tensors: a "copy" roofline of 8 B per element and a note per row."""
    bench_step = _bench_step()
    total = 65536
    params = [torch.nn.Parameter(torch.randn(total))]
    params[0].grad = torch.randn(total)
    opt, step = bench_step.METHODS["torchsgd8_8bit"](params)
    step()
    entries = [bench_step.Entry("torchsgd8_8bit", step, opt, params, [1e-3], [2e-5, 1e-5], note="a note"),
               bench_step.Entry("copy", lambda: None, times_s=[1e-5])]
    config = bench_step.summarize(total, "single", [(total,)], entries, torch.float32,
                                  bench_step.ROOFLINES["cuda"], "cuda")
    assert "axpy" not in config and config["copy"]["gbps"] == pytest.approx(8 * total / 1e-5 / 1e9)
    (row,) = config["methods"]
    assert row["note"] == "a note" and row.keys() == METHOD_FIELDS | {"note"}
    assert row["x_roofline"] == pytest.approx(1.5e-5 / (row["ideal_bytes"] / (8 * total / 1e-5)))


def test_cudagraph_skips_are_noted_with_inductors_reason():
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    bench_step = _bench_step()
    with bench_step.CudagraphSkips() as skips:
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to mutated inputs (2 instances)\nFound from: x")
    assert skips.count == 1
    assert skips.note() == "CUDA graphs not used (1 graph(s) skipped): skipping cudagraphs due to mutated inputs (2 instances)"
    with bench_step.CudagraphSkips() as none:
        pass
    assert none.count == 0 and none.note() is None


# ---- tools/gpu_check.sh -----------------------------------------------------------------------------------------

def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@SLOW
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
def test_gpu_check_dry_run_passes_its_phases(tmp_path):
    """GPU_CHECK_DRY_RUN=1: every phase's command line runs on CPU (tests collected, the step check on CPU, the CUDA
    benchmark command refused for want of a GPU) and the summary says so."""
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "summary.txt").read_text()
    for phase in ("environment", "carried-packages", "build", "tests", "step-check", "bench-cuda-refuses", "bench-cpu"):
        assert f"phase {phase}: ok" in summary
    assert "gpu_check: OK" in summary
    assert "gpu_step_check: " in (tmp_path / "step_check.log").read_text()
    assert "--device cuda: no CUDA device" in (tmp_path / "bench.log").read_text()
