"""FSDP2 (fully_shard) training with torchsgd8, a torch.distributed.checkpoint save, a load, and more training.

How to run (CPU, gloo backend)::

    # 2 processes
    .venv/bin/torchrun --nproc-per-node 2 examples/fsdp2_train.py --checkpoint-dir /tmp/fsdp2_ckpt
    # 1 process (either way)
    .venv/bin/torchrun --nproc-per-node 1 examples/fsdp2_train.py
    .venv/bin/python examples/fsdp2_train.py
    # fp32 momentum instead of 8-bit
    .venv/bin/torchrun --nproc-per-node 2 examples/fsdp2_train.py --optimizer sgd32bit

What it does:
  1. builds a small MLP, wraps each Linear and the root in ``fully_shard`` over a 1-D CPU device mesh, so
     every param is a DTensor sharded along dim 0 (``Shard(0)``);
  2. trains it with ``torchsgd8.SGD8bit`` (default) or ``torchsgd8.SGD32bit`` on synthetic regression data
     (a fixed random "teacher" network); each step draws one global batch and each rank takes its rows,
     so every world size trains on the same data;
  3. saves model and optimizer with ``get_state_dict`` + ``dcp.save`` to ``--checkpoint-dir``;
  4. builds a FRESH model and optimizer (as a restarted job would), ``dcp.load``s the checkpoint into
     their state-dict structure and ``set_state_dict``s it back, checks that the params came back exactly;
  5. trains on. Rank 0 prints the global mean loss, which goes down across both phases.

A checkpoint saved at one world size loads at another (DCP reshards), e.g. save with 2 processes and
resume with 1: ``--resume`` skips phase 1 and starts from the checkpoint in ``--checkpoint-dir``.

The optimizer step updates each rank's local shard with torchsgd8's fused op (no all-gather); the
optimizer state is DTensors sharded like the params, so DCP saves and reshards it. With SGD8bit, params
of at least ``--min-8bit-size`` elements get 8-bit momentum where they have 2+ dims and rows of at least
128 elements (blocked per row, so quantization blocks never straddle shards; the weights here have rows
of 200 and 300 elements); other sharded params (biases) keep fp32 momentum. The script prints which
state each param got.
"""
from __future__ import annotations

import argparse
import gc
import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import torchsgd8

IN, HIDDEN, OUT = 200, 300, 4  # weights (300, 200), (300, 300): 8-bit state blocked per row


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=["sgd8bit", "sgd32bit"], default="sgd8bit")
    parser.add_argument("--checkpoint-dir", default=os.path.join(tempfile.gettempdir(), "torchsgd8_fsdp2_ckpt"))
    parser.add_argument("--steps", type=int, default=60, help="steps before the checkpoint")
    parser.add_argument("--more-steps", type=int, default=60, help="steps after loading it")
    parser.add_argument("--batch", type=int, default=64, help="global batch size (split across ranks)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--nesterov", action="store_true")
    parser.add_argument("--min-8bit-size", type=int, default=4096)
    parser.add_argument("--resume", action="store_true", help="skip training before the checkpoint; load it")
    parser.add_argument("--print-every", type=int, default=20)
    return parser.parse_args()


def init_distributed() -> tuple[int, int]:
    """torchrun sets RANK/WORLD_SIZE/MASTER_*; a plain `python` run becomes a 1-process group."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def build_model(mesh) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and at every world size
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                          nn.Linear(HIDDEN, OUT))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    cls = {"sgd32bit": torchsgd8.SGD32bit, "sgd8bit": torchsgd8.SGD8bit}[args.optimizer]
    return cls(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
               nesterov=args.nesterov, min_8bit_size=args.min_8bit_size)


def teacher_batch(step: int, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s global batch: inputs and a fixed random teacher's outputs (plus a little noise)."""
    teacher = torch.Generator().manual_seed(1234)
    w1 = torch.randn(IN, 64, generator=teacher) / IN ** 0.5
    w2 = torch.randn(64, OUT, generator=teacher) / 8.0
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(global_batch, IN, generator=g)
    y = torch.tanh(x @ w1) @ w2 + 0.01 * torch.randn(global_batch, OUT, generator=g)
    return x, y


def train(model, opt, steps: range, args, rank: int, world: int) -> list[float]:
    losses = []
    for step in steps:
        x, y = teacher_batch(step, args.batch)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()  # FSDP2 reduce-scatters the grads: each rank gets its shard's averaged grad
        opt.step()  # torchsgd8 updates each rank's local shard in place
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, op=dist.ReduceOp.SUM)
        losses.append(global_loss.item() / world)
        if rank == 0 and (len(losses) % args.print_every == 0 or step == steps[-1]):
            window = losses[-args.print_every:]
            print(f"step {step:4d}  loss {losses[-1]:.5f}  (mean of the last {len(window)}: "
                  f"{sum(window) / len(window):.5f})", flush=True)
    return losses


def full_params(model) -> dict[str, torch.Tensor]:
    """Every param gathered whole (a collective: every rank must call it)."""
    return {n: p.full_tensor().detach().clone() if isinstance(p, DTensor) else p.detach().clone()
            for n, p in model.named_parameters()}


def describe_state(model, opt) -> str:
    lines = []
    for name, p in model.named_parameters():
        state = opt.state[p]
        if "state1" in state:
            kind = "8-bit momentum (state1 uint8 + absmax1)"
        elif "momentum_buffer" in state:
            kind = "fp32 momentum_buffer"
        else:
            kind = "no state"
        if isinstance(state.get("state1", state.get("momentum_buffer")), DTensor):
            kind += " (DTensor, sharded like the param)"
        lines.append(f"  {name:10s} {tuple(p.shape)!s:12s} {kind}")
    return "\n".join(lines)


def run(args: argparse.Namespace, rank: int, world: int, mesh) -> None:
    total = args.steps + args.more_steps
    model = build_model(mesh)
    opt = build_optimizer(model, args)

    if not args.resume:
        # ---- phase 1: train, then save a distributed checkpoint ----
        first = train(model, opt, range(args.steps), args, rank, world)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=args.checkpoint_dir)
        saved = full_params(model)
        if rank == 0:
            print(f"saved step {args.steps} to {args.checkpoint_dir}", flush=True)
            print(f"optimizer state:\n{describe_state(model, opt)}", flush=True)

    # ---- phase 2: a fresh model and optimizer (as a restarted job) load the checkpoint and train on ----
    model = build_model(mesh)
    opt = build_optimizer(model, args)
    model_sd, optim_sd = get_state_dict(model, opt)  # creates the optimizer state, so DCP can fill it
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=args.checkpoint_dir)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded = full_params(model)
    if not args.resume:
        same = all(torch.equal(loaded[n], saved[n]) for n in saved)
        if rank == 0:
            print(f"loaded the checkpoint: params {'identical to' if same else 'DIFFERENT from'} the saved ones",
                  flush=True)
        if not same:
            raise RuntimeError("the loaded params differ from the saved ones")
    second = train(model, opt, range(args.steps, total), args, rank, world)
    if rank == 0:
        losses = second if args.resume else first + second
        k = min(args.print_every, len(losses))
        print(f"mean loss of the first {k} steps {sum(losses[:k]) / k:.5f} -> of the last {k} steps "
              f"{sum(losses[-k:]) / k:.5f}", flush=True)


def main() -> None:
    args = parse_args()
    rank, world = init_distributed()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mesh = init_device_mesh("cpu", (world,))
    if rank == 0:
        print(f"world size {world}, optimizer {args.optimizer}, checkpoint {args.checkpoint_dir}", flush=True)
    try:
        run(args, rank, world, mesh)
    except NotImplementedError as e:  # e.g. an optimizer configuration the library cannot shard yet
        if rank == 0:
            print(f"not supported: {e}", flush=True)
        shutdown()
        raise SystemExit(2) from None
    shutdown()


def shutdown() -> None:
    # FSDP2 modules sit in reference cycles that keep gloo work objects alive; freed only at interpreter
    # exit, they can abort the process ("terminate called without an active exception"). Collect them
    # now, while everything they need still exists.
    gc.collect()
    dist.barrier()  # no rank tears gloo down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
