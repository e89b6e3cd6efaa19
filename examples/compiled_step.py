"""A whole training step -- forward, gradients and an 8-bit SGD update -- compiled as ONE graph.

The pattern
-----------
::

    torch._dynamo.config.trace_autograd_ops = True        # let dynamo trace torch.autograd.grad

    @torch.compile(fullgraph=True)                          # fullgraph: any graph break is an error
    def train_step(x, y):
        loss = loss_fn(model(x), y)
        grads = torch.autograd.grad(loss, params)           # not loss.backward(): that always breaks
        for p, g in zip(params, grads):
            p.grad = g
        type(opt).step(opt)                                 # see "LR schedulers" below
        return loss.detach()                                # not `loss` (its grad_fn was consumed)

Three things make this one graph:

* ``torch.autograd.grad`` is traced when ``torch._dynamo.config.trace_autograd_ops`` is on, whereas
  ``loss.backward()`` always breaks the graph.
* torchsgd8's ``step()`` is a plain ``@torch.no_grad()`` function that calls one fused custom op per
  bucket of params (``torchsgd8::sgd8bit_update_`` / ``sgd_update_``, with fake implementations for
  tracing). torch.optim's own step calls ``torch._dynamo.graph_break()`` and cannot be used here.
* Hyperparameters reach the ops as 0-dim tensors. With ``lr=torch.tensor(...)`` an LR scheduler updates
  the tensor in place, so the compiled step reads the new value without recompiling.

LR schedulers
-------------
A scheduler replaces ``opt.step`` on the instance with a counting wrapper that dynamo does not trace, so
the compiled function calls the class's step, ``type(opt).step(opt)``. The scheduler then never sees
that step was called and warns about the call order; that warning is silenced below.

The first call compiles once more than the rest: it creates the optimizer state (the 8-bit codes and
absmax), so expect 2 compiled frames in total and 0 graph breaks, however many steps run.

The problem is a small synthetic regression (a random "teacher" MLP generates the targets), so the script
needs no data set and finishes in seconds.

Run:  .venv/bin/python examples/compiled_step.py [--steps 300] [--backend inductor]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import torchsgd8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128, help="hidden width of the student MLP")
    parser.add_argument("--lr", type=float, default=0.05, help="peak learning rate")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--min-8bit-size", type=int, default=1024,
                        help="params with at least this many elements keep 8-bit momentum (default 1024)")
    parser.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                        help="torch.compile backend (default inductor)")
    parser.add_argument("--print-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_problem(args: argparse.Namespace, n: int = 4096, dim: int = 16):
    """A fixed data set: inputs x ~ N(0, 1), targets from a random teacher MLP plus a little noise."""
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, 32, generator=g) / dim**0.5
    w2 = torch.randn(32, 1, generator=g) / 32**0.5
    y = torch.tanh(x @ w1) @ w2 + 0.01 * torch.randn(n, 1, generator=g)
    return x, y


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    x_all, y_all = make_problem(args)
    model = torch.nn.Sequential(
        torch.nn.Linear(x_all.shape[1], args.hidden), torch.nn.Tanh(), torch.nn.Linear(args.hidden, 1)
    )
    params = list(model.parameters())

    # A 0-dim tensor lr: the scheduler updates it in place, the compiled step never recompiles for it.
    opt = torchsgd8.SGD8bit(params, lr=torch.tensor(args.lr), momentum=args.momentum,
                            min_8bit_size=args.min_8bit_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr / 20)
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        type(opt).step(opt)  # opt.step is the scheduler's wrapper, which dynamo does not trace
        return loss.detach()

    counter = CompileCounterWithBackend(args.backend)
    compiled_step = torch.compile(train_step, backend=counter, fullgraph=True)
    counters.clear()

    n = x_all.shape[0]
    batches_per_epoch = n // args.batch_size
    first = last = None
    start = time.perf_counter()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for step in range(args.steps):
            i = (step % batches_per_epoch) * args.batch_size
            loss = compiled_step(x_all[i:i + args.batch_size], y_all[i:i + args.batch_size])
            scheduler.step()
            if step == 0:
                first = loss.item()
            if step % args.print_every == 0 or step == args.steps - 1:
                last = loss.item()
                lr = float(opt.param_groups[0]["lr"])
                print(f"step {step:4d}  loss {last:.5f}  lr {lr:.5f}")
    elapsed = time.perf_counter() - start

    with torch.no_grad():
        full_loss = F.mse_loss(model(x_all), y_all).item()
    eight_bit = sum(p.numel() for p in params if "state1" in opt.state[p])
    full = sum(p.numel() for p in params if "momentum_buffer" in opt.state[p])
    breaks = sum(counters["graph_break"].values())
    print(f"\n{args.steps} steps in {elapsed:.1f} s (backend {args.backend}, compile time included)")
    print(f"loss: first batch {first:.5f} -> last batch {last:.5f}; whole data set {full_loss:.5f}")
    print(f"params with 8-bit momentum: {eight_bit} elements, with fp32 momentum: {full}")
    print(f"compiled frames: {counter.frame_count} (first step creates state, then one graph for all "
          f"later steps); graph breaks: {breaks}")
    if breaks or counter.frame_count > 2 or not last < first:
        raise SystemExit("unexpected: graph breaks, recompilation, or the loss did not go down")


if __name__ == "__main__":
    main()
