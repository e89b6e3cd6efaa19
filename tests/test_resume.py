"""Bit-exact resume across processes.

For each configuration a small script (written to tmp_path, run with this interpreter) trains a seeded
model with seeded data:
  * "full":   K + N steps without interruption;
  * "first":  K steps, then torch.save({model, optimizer, scheduler} state dicts);
  * "resume": a FRESH process builds the model and optimizer anew, torch.load(weights_only=True)s the
              checkpoint, loads it, and trains the remaining N steps.
The params and the optimizer state of "resume" must equal those of "full" bit for bit. Configurations:
fp32 momentum, 8-bit momentum (with a tensor lr driven by a StepLR scheduler), bf16 params with 8-bit
momentum and stochastic rounding (the rounding seed travels in the state dict), and one compiled case:
torch.compile(opt.step) in both the first and the resumed process, compared with the eager uninterrupted
run (the compiled step runs the same kernels, so it is bitwise the eager step).

Each process uses one intra-op thread, so the model's own matmuls are reproducible too.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

K, N = 3, 4

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    import torch.nn.functional as F
    import torchsgd8

    mode, cfg, ckpt, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
    K, N = cfg["K"], cfg["N"]
    torch.set_num_threads(1)
    dtype = getattr(torch, cfg["dtype"])

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(dtype)
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    lr = torch.tensor(cfg["lr"]) if cfg["tensor_lr"] else cfg["lr"]
    opt = torchsgd8.SGD([{"params": weights}, {"params": biases, "weight_decay": 0.0, "lr": 0.02}], lr=lr,
                        momentum=0.9, dampening=cfg["dampening"], weight_decay=1e-3, nesterov=cfg["nesterov"],
                        optim_bits=cfg["bits"], min_8bit_size=256, stochastic_rounding=cfg["sr"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) if cfg["scheduler"] else None
    counter = None
    if cfg["compiled"]:
        from torch._dynamo.testing import CompileCounterWithBackend
        counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True) if cfg["compiled"] else opt.step

    def train(start, stop):
        for i in range(start, stop):
            g = torch.Generator().manual_seed(1000 + i)
            x = torch.randn(32, 16, generator=g).to(dtype)
            y = torch.randn(32, 8, generator=g).to(dtype)
            opt.zero_grad()  # set_to_none: new grad tensors every step, as in a normal loop
            F.mse_loss(model(x).float(), y.float()).backward()
            step()
            if sched is not None:
                sched.step()

    if mode == "full":
        train(0, K + N)
    elif mode == "first":
        train(0, K)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict() if sched else None}, ckpt)
    else:
        saved = torch.load(ckpt, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        if sched is not None:
            sched.load_state_dict(saved["sched"])
        train(K, K + N)
    torch.save({"params": [p.detach().clone() for p in model.parameters()],
                "opt": opt.state_dict(), "lr": [float(g["lr"]) for g in opt.param_groups],
                "compiled_frames": counter.frame_count if counter else None}, out)
''')

BASE = dict(K=K, N=N, dtype="float32", lr=0.05, tensor_lr=False, dampening=0.0, nesterov=False, bits=32,
            sr=False, scheduler=False, compiled=False)
CASES = {
    "fp32": dict(nesterov=True),
    "8bit": dict(bits=8, dampening=0.1, tensor_lr=True, scheduler=True),
    "bf16-8bit-stochastic-rounding": dict(dtype="bfloat16", bits=8, sr=True),
}


def start(tmp_path, mode: str, cfg: dict, name: str) -> tuple[subprocess.Popen, str]:
    script = tmp_path / "train.py"
    if not script.exists():
        script.write_text(SCRIPT)
    out = str(tmp_path / f"{name}-{mode}.pt")
    proc = subprocess.Popen([sys.executable, str(script), mode, json.dumps(cfg), str(tmp_path / f"{name}.ckpt"), out],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, out


def finish(job) -> dict:
    proc, out = job
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return torch.load(out, weights_only=True)


def assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
    assert len(a["params"]) == len(b["params"])
    for i, (x, y) in enumerate(zip(a["params"], b["params"])):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y), f"{what}: param {i} differs (max {(x.float() - y.float()).abs().max().item():.3g})"
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys(), what
    for pid in sa:
        assert sa[pid].keys() == sb[pid].keys(), (what, pid)
        for key, value in sa[pid].items():
            assert torch.equal(value, sb[pid][key]), f"{what}: state[{pid}][{key!r}] differs"
    for ga, gb in zip(a["opt"]["param_groups"], b["opt"]["param_groups"]):
        for key in ("lr", "rounding_seed"):
            if key in ga:
                va, vb = ga[key], gb[key]
                same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
                assert same, f"{what}: param group {key} {va} != {vb}"
    assert a["lr"] == b["lr"], what


def check_run(full: dict, first_path: str, resumed: dict, cfg: dict, what: str) -> None:
    assert_bitwise_equal(resumed, full, what)
    first = torch.load(first_path, weights_only=True)
    # not vacuous: the resumed process did train, from the checkpoint's state
    assert any(not torch.equal(p, q) for p, q in zip(first["params"], resumed["params"])), what
    kinds = {("8bit" if "state1" in s else "full") for s in resumed["opt"]["state"].values()}
    assert kinds == ({"8bit", "full"} if cfg["bits"] == 8 else {"full"}), kinds
    for s in resumed["opt"]["state"].values():
        if "step" in s:
            assert s["step"].item() == K + N  # the step count went on from the checkpoint


@pytest.mark.parametrize("case", CASES)
def test_resume_in_a_fresh_process_is_bitwise_identical(tmp_path, case):
    cfg = dict(BASE, **CASES[case])
    full = start(tmp_path, "full", cfg, case)
    first = start(tmp_path, "first", cfg, case)
    finish(first)
    resumed = finish(start(tmp_path, "resume", cfg, case))
    check_run(finish(full), first[1], resumed, cfg, case)
    if cfg["scheduler"]:
        assert resumed["lr"][0] == pytest.approx(0.05 * 0.5 ** ((K + N) // 2))


def test_compiled_step_resume_is_bitwise_the_eager_uninterrupted_run(tmp_path):
    """One compiled case (compilation dominates): 8-bit state, compiled step in the first and in the
    resumed process; the eager uninterrupted run is the reference."""
    eager = dict(BASE, bits=8, dampening=0.1, nesterov=False)
    compiled = dict(eager, compiled=True)
    full = start(tmp_path, "full", eager, "eager")
    first = start(tmp_path, "first", compiled, "compiled")
    finish(first)
    resumed = finish(start(tmp_path, "resume", compiled, "compiled"))
    check_run(finish(full), first[1], resumed, compiled, "compiled resume vs eager uninterrupted")
    # the step really ran compiled: one graph for the steady state (the state came from the checkpoint),
    # plus at most one recompile when StepLR first changes the bias group's plain float lr (dynamo then
    # treats that float as dynamic; see README "What compiles when")
    assert resumed["compiled_frames"] in (1, 2), resumed["compiled_frames"]
    assert torch.load(first[1], weights_only=True)["compiled_frames"] in (1, 2, 3)  # first step, steady, float lr


def test_checkpoint_is_a_plain_weights_only_state_dict(tmp_path):
    """What the resume relies on: the saved optimizer state loads with weights_only=True and carries the
    format version; the momentum state is what makes the resume exact (restarting it changes the run)."""
    cfg = dict(BASE, bits=8)
    full = start(tmp_path, "full", cfg, "plain-full")
    finish(start(tmp_path, "first", cfg, "plain"))
    saved = torch.load(tmp_path / "plain.ckpt", weights_only=True)
    assert saved["opt"]["torchsgd8_format_version"] == 2
    assert {"step", "state1", "absmax1", "qmap1"} in [set(s) for s in saved["opt"]["state"].values()]
    # dropping the optimizer state and resuming must NOT reproduce the uninterrupted run
    del saved["opt"]["state"][0]
    torch.save(saved, tmp_path / "plain.ckpt")
    resumed = finish(start(tmp_path, "resume", cfg, "plain"))
    full = finish(full)
    assert not all(torch.equal(p, q) for p, q in zip(full["params"], resumed["params"]))
