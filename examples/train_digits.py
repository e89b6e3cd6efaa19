"""Train a small MLP on scikit-learn's digits with torch.optim.SGD, torchsgd8.SGD32bit and torchsgd8.SGD8bit.

    python examples/train_digits.py                        # 3 seeds x 30 epochs (`make demo`), ~45 s
    python examples/train_digits.py --quick                # 1 seed x 3 epochs, compiled: smoke test, ~20 s
    python examples/train_digits.py --quick --no-compile   # the same, eager: < 10 s
(times on 2 busy CPU cores, most of them compilation and imports.)

Setup. The 1797 8x8 digit images (bundled with scikit-learn, no download) are split once into a fixed,
stratified 75/25 train/test split and standardized with the training set's statistics. The model is an
MLP 64 -> 256 -> 256 -> 10, so its two hidden weight matrices (16384 and 65536 elements) are above
SGD8bit's default min_8bit_size=4096 and get 8-bit momentum; the 256x10 output weight (2560) and the
biases keep fp32 buffers. Every optimizer runs with lr=0.05, momentum=0.9, nesterov off and on, on
minibatches of 64. For a given seed all optimizers start from the same weights and see the same batches,
so the differences between them come from the optimizer alone.

Compilation, the same for every optimizer:
  * forward + loss: torch.compile(fullgraph=True);
  * loss.backward(): eager (autograd runs the compiled backward graph that AOTAutograd produced);
  * optimizer.step(): torch.compile(optimizer.step). torchsgd8's step is compiled with fullgraph=True.
    torch.optim.SGD's step cannot be: its no-grad wrapper calls torch._dynamo.graph_break() on purpose,
    so it is compiled with fullgraph=False, which is torch's own documented recipe for compiled
    optimizers; the region between the graph breaks still becomes one compiled graph.
Each (optimizer, nesterov) configuration builds one optimizer and compiles its step once; the seeds
re-initialise the model's parameters in place and clear the optimizer's state (which, for SGD, is all
that distinguishes a used optimizer from a fresh one), so the seeds reuse the compiled graphs instead of
recompiling for every new object (torch.optim.SGD's compiled step still recompiles once per seed: it
guards on the identity of its momentum buffers). Gradients are reset with optimizer.zero_grad(), i.e.
set to None, so every step sees new gradient tensors, as in ordinary training. The progress lines say
how many graphs each configuration compiled. Compilation takes most of the run time; --no-compile runs
the same experiment eagerly.

Runs use 1 intra-op thread by default (--threads): the matmuls are far too small to gain from more, and
with other jobs on the machine extra threads make step times erratic (spinning OpenMP barriers).

Reported per configuration: mean +- std test accuracy over seeds, optimizer state bytes per trainable
parameter (every tensor in optimizer.state, each storage counted once, so SGD8bit's shared qmap1 counts
once per optimizer), and the median time of one compiled optimizer step and of one whole training step.
The script exits with status 1 when SGD8bit's mean test accuracy (either nesterov setting) is more than
--tolerance points away from torch.optim.SGD's (not enforced with --quick, whose single short run is
too noisy for a 0.5-point check), and writes the training-loss curves to examples/out/digits_loss.png.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import torchsgd8

OUT_DIR = Path(__file__).resolve().parent / "out"
OPTIMIZERS = {
    "torch.optim.SGD": torch.optim.SGD,
    "torchsgd8.SGD32bit": torchsgd8.SGD32bit,
    "torchsgd8.SGD8bit": torchsgd8.SGD8bit,
}
REFERENCE, EIGHT_BIT = "torch.optim.SGD", "torchsgd8.SGD8bit"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs per run (default 30)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers (default 256)")
    p.add_argument("--tolerance", type=float, default=0.5,
                   help="max |mean acc(SGD8bit) - mean acc(torch.optim.SGD)| in points (default 0.5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these matmuls are too small to gain from more, "
                        "and with other jobs on the cores extra threads make step times erratic)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run everything eagerly (skips the ~10-20 s of compilation)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: 1 seed, 3 epochs, accuracy check reported but not enforced")
    p.add_argument("--out", type=Path, default=OUT_DIR / "digits_loss.png", help="where to write the PNG")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 3
    return args


# ---- data and model ---------------------------------------------------------------------------------


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_train)  # constant pixels (always 0) get scale 1, not a division by 0
    as_x = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )


@torch.no_grad()
def reset_model(model: nn.Module, seed: int) -> None:
    """Seed-determined fresh initialisation, in place (the same parameter objects, so graphs are reused)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    model.zero_grad(set_to_none=True)


def forward_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (model(x).argmax(dim=1) == y).float().mean().item()


def state_bytes_per_param(optimizer: torch.optim.Optimizer, model: nn.Module) -> float:
    """Bytes of every tensor in optimizer.state, each distinct storage once, per trainable parameter."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
                if key not in seen:
                    seen.add(key)
                    total += value.untyped_storage().nbytes()
    return total / sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- training ---------------------------------------------------------------------------------------


def run_config(name: str, nesterov: bool, model: nn.Module, compiled_loss, data, args) -> dict:
    """Trains one (optimizer, nesterov) configuration for every seed; returns its results."""
    x_train, y_train, x_test, y_test = data
    optimizer = OPTIMIZERS[name](model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=nesterov)
    fullgraph = name != REFERENCE  # torch.optim.SGD.step graph-breaks by design (see the module docstring)
    compiled_step = torch.compile(optimizer.step, fullgraph=fullgraph) if args.compile else optimizer.step
    n_batches = len(x_train) // args.batch_size  # drop the last partial batch: one static shape, no recompiles

    accs, curves, opt_ms, train_ms, state_bpp = [], [], [], [], None
    for seed in range(args.seeds):
        reset_model(model, seed)
        optimizer.state.clear()  # a fresh optimizer's state; param_groups are unchanged by training
        batch_order = torch.Generator().manual_seed(1000 + seed)  # same batches for every optimizer
        curve = []
        for _ in range(args.epochs):
            perm = torch.randperm(len(x_train), generator=batch_order)
            epoch_loss = torch.zeros(())
            for b in range(n_batches):
                idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
                t0 = time.perf_counter()
                loss = compiled_loss(model, x_train[idx], y_train[idx])
                loss.backward()
                t1 = time.perf_counter()
                compiled_step()
                t2 = time.perf_counter()
                optimizer.zero_grad()  # torch's default, set_to_none=True: fresh grad tensors every step
                opt_ms.append(1e3 * (t2 - t1))
                train_ms.append(1e3 * (time.perf_counter() - t0))
                epoch_loss += loss.detach()
            curve.append(epoch_loss.item() / n_batches)
        accs.append(accuracy(model, x_test, y_test))
        curves.append(curve)
        if state_bpp is None:
            state_bpp = state_bytes_per_param(optimizer, model)
    return {
        "name": name, "nesterov": nesterov, "accs": accs, "curves": curves, "state_bpp": state_bpp,
        "opt_ms": statistics.median(opt_ms), "train_ms": statistics.median(train_ms),
    }


# ---- report -----------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def print_table(results: list[dict], args) -> None:
    header = ("optimizer", "nesterov", f"test acc % ({args.seeds} seeds)", "state B/param",
              "opt step ms", "train step ms")
    rows = []
    for r in results:
        mean, std = mean_std(r["accs"])
        rows.append((r["name"], "on" if r["nesterov"] else "off", f"{mean:6.2f} ± {std:4.2f}",
                     f"{r['state_bpp']:.3f}", f"{r['opt_ms']:.3f}", f"{r['train_ms']:.3f}"))
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    line = lambda row: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                                 for i, (c, w) in enumerate(zip(row, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))


def check_accuracy(results: list[dict], args) -> bool:
    ok = True
    for nesterov in (False, True):
        by_name = {r["name"]: r for r in results if r["nesterov"] == nesterov}
        ref, q = statistics.fmean(by_name[REFERENCE]["accs"]), statistics.fmean(by_name[EIGHT_BIT]["accs"])
        within = abs(q - ref) <= args.tolerance
        ok &= within
        print(f"nesterov {'on ' if nesterov else 'off'}: SGD8bit {q:.2f}% vs torch.optim.SGD {ref:.2f}% "
              f"(diff {q - ref:+.2f} points): {'OK' if within else 'FAIL'}, tolerance {args.tolerance} points")
    return ok


def plot_curves(results: list[dict], args) -> Path:
    """Top row: training loss per epoch (mean over seeds). Bottom row: each optimizer's loss relative to
    torch.optim.SGD's on the same seeds, in percent (SGD32bit should sit on 0, SGD8bit close to it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    styles = {REFERENCE: ("black", "-", 2.5), "torchsgd8.SGD32bit": ("tab:blue", "--", 1.8),
              EIGHT_BIT: ("tab:red", ":", 2.2)}
    epochs = list(range(1, args.epochs + 1))
    mean_curve = lambda r: [statistics.fmean(c[e] for c in r["curves"]) for e in range(args.epochs)]  # noqa: E731
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, sharey="row",
                             gridspec_kw={"height_ratios": [2, 1]})
    for col, nesterov in enumerate((False, True)):
        group = [r for r in results if r["nesterov"] == nesterov]
        ref = mean_curve(next(r for r in group if r["name"] == REFERENCE))
        top, bottom = axes[0, col], axes[1, col]
        for r in group:
            color, ls, lw = styles[r["name"]]
            curve = mean_curve(r)
            top.plot(epochs, curve, color=color, linestyle=ls, linewidth=lw, marker="o", markersize=2.5,
                     label=f"{r['name']} (test {statistics.fmean(r['accs']):.2f}%)")
            bottom.plot(epochs, [100.0 * (c / c0 - 1.0) for c, c0 in zip(curve, ref)], color=color,
                        linestyle=ls, linewidth=lw, marker="o", markersize=2.5)
        top.set_yscale("log")
        top.set_title(f"momentum {args.momentum}, nesterov {'on' if nesterov else 'off'}")
        top.grid(True, which="both", alpha=0.3)
        top.legend()
        bottom.axhline(0.0, color="gray", linewidth=0.8)
        bottom.grid(True, alpha=0.3)
        bottom.set_xlabel("epoch")
        bottom.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    seeds = f"mean of {args.seeds} seed{'s' * (args.seeds > 1)}"
    axes[0, 0].set_ylabel(f"training loss (epoch mean, {seeds})")
    axes[1, 0].set_ylabel("loss vs torch.optim.SGD (%)")
    fig.suptitle(f"MLP 64-{args.hidden}-{args.hidden}-10 on sklearn digits, lr {args.lr}, "
                 f"batch {args.batch_size}")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    return args.out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    # Dynamo caches graphs per code object, and all six optimizers' steps enter through one (Optimizer's
    # step wrapper): torch.optim.SGD adds 1 graph there, torchsgd8 2 or 3 (first step, later steps, and a
    # first step that finds the shared qmap already made), 14 in all. torch.optim.SGD's inner step also
    # recompiles for every seed (it guards on its state tensors' identity): 2 graphs per seed per config.
    # Dynamo's default limit of 8 is too small for either; this one fits them, and a step that recompiled
    # every iteration would still hit it quickly (a fullgraph=True step then raises rather than going eager).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16, 4 * args.seeds + 4)

    data = load_data()
    model = make_model(args.hidden)
    compiled_loss = torch.compile(forward_loss, fullgraph=True) if args.compile else forward_loss
    print(f"digits: {len(data[0])} train / {len(data[2])} test; MLP 64-{args.hidden}-{args.hidden}-10 "
          f"({sum(p.numel() for p in model.parameters())} params); {args.seeds} seed(s) x {args.epochs} epochs, "
          f"batch {args.batch_size}, lr {args.lr}, momentum {args.momentum}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), {'compiled' if args.compile else 'eager'}")

    results = []
    for name in OPTIMIZERS:
        for nesterov in (False, True):
            t, graphs = time.perf_counter(), torch._dynamo.utils.counters["stats"]["unique_graphs"]
            try:
                results.append(run_config(name, nesterov, model, compiled_loss, data, args))
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                print(f"FAILED: {name} (nesterov {'on' if nesterov else 'off'}): its compiled step kept "
                      f"recompiling past dynamo's recompile_limit ({torch._dynamo.config.recompile_limit}); "
                      "rerun with TORCH_LOGS=recompiles to see which guards failed",
                      file=sys.stderr)
                return 1
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
            print(f"  {name:<20} nesterov {'on ' if nesterov else 'off'}  {time.perf_counter() - t:5.1f} s, "
                  f"{graphs} graph(s) compiled", flush=True)
    print()
    print_table(results, args)
    print()
    ok = check_accuracy(results, args)
    path = plot_curves(results, args)
    print(f"loss curves: {os.path.relpath(path)}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    if not ok:
        if args.quick:
            print("accuracy check not enforced with --quick (1 short run is too noisy)")
        else:
            print(f"FAILED: SGD8bit's mean test accuracy is more than {args.tolerance} points from torch.optim.SGD's",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
