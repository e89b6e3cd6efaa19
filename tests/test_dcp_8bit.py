"""8-bit optimizer state under FSDP2 through torch.distributed.checkpoint, across world sizes.

8-bit state of a param with rows of >= 128 elements is blocked per row, with absmax stored as (rows,
blocks per row): it shards along dim 0 like the param, so a checkpoint saved at one world size - or by
a plain, unsharded run - loads exactly at another. The weight here has rows of 300 elements (a 256-block
and a 44-element block per row), so blocks of the flat layout would straddle rows and shards. Each run
is a small script started with torchrun (--standalone picks a free port); results come back through
files in tmp_path.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

import torchsgd8

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch built without distributed / gloo")

SCRIPT = textwrap.dedent('''
    import gc, sys, torch, torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import torchsgd8

    mode, ckpt, out = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # weights (40, 300) and (4, 40): the first has 300-element rows (8-bit state), the second is small
    model = torch.nn.Sequential(torch.nn.Linear(300, 40), torch.nn.ReLU(), torch.nn.Linear(40, 4))
    sharded = mode != "save-unsharded"
    if sharded:
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torchsgd8.SGD8bit(model.parameters(), lr=0.05, momentum=0.9, min_8bit_size=1000)

    def train(steps):
        for step in steps:
            g = torch.Generator().manual_seed(100 + step)
            x, y = torch.randn(8, 300, generator=g), torch.randn(8, 4, generator=g)
            loss = torch.nn.functional.mse_loss(model(x.chunk(world)[rank]), y.chunk(world)[rank])
            loss.backward()
            opt.step()
            opt.zero_grad()

    def full(t):
        return (t.full_tensor() if sharded else t).clone()

    def state_of_first_weight():
        st = opt.state[model[0].weight]
        return {k: full(st[k]) for k in ("state1", "absmax1")}

    result = {}
    if mode.startswith("save"):
        train(range(3))
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
        result["saved_state"] = state_of_first_weight()
        absmax = opt.state[model[0].weight]["absmax1"]
        result["absmax_local_shape"] = tuple((absmax.to_local() if sharded else absmax).shape)
    else:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        result["loaded_state"] = state_of_first_weight()
    train(range(3, 6))
    result["params"] = [full(p.detach()) for p in model.parameters()]
    if rank == 0:
        torch.save(result, out)
    del model, opt
    gc.collect()  # free FSDP2's objects before tearing gloo down (avoids a rare crash at exit)
    dist.barrier()
    dist.destroy_process_group()
''')


def _torchrun(tmp_path, nproc, *args):
    script = tmp_path / "dcp8.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(script),
           *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_8bit_state_saved_at_world_size_2_loads_exactly_at_1_and_2(tmp_path):
    ckpt = tmp_path / "ckpt"
    _torchrun(tmp_path, 2, "save", ckpt, tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    # (40, 300) weight: 40 rows of two blocks each, 20 rows per rank
    assert saved["absmax_local_shape"] == (20, 2)
    assert saved["saved_state"]["state1"].dtype == torch.uint8
    assert saved["saved_state"]["absmax1"].shape == (40, 2)

    for world in (1, 2):
        _torchrun(tmp_path, world, "load", ckpt, tmp_path / f"loaded{world}.pt")
        loaded = torch.load(tmp_path / f"loaded{world}.pt", weights_only=True)
        # the 8-bit state reshards exactly: identical codes and absmax at either world size
        for key in ("state1", "absmax1"):
            assert torch.equal(loaded["loaded_state"][key], saved["saved_state"][key]), (world, key)
        for a, b in zip(loaded["params"], saved["params"]):
            if world == 2:  # same shards, same reductions: the resumed run replays the uninterrupted one
                assert torch.equal(a, b)
            else:  # one rank sums the batch in one matmul: gradients may differ in the last bit
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_8bit_state_of_an_unsharded_run_loads_exactly_into_fsdp2_at_world_size_2(tmp_path):
    ckpt = tmp_path / "ckpt"
    _torchrun(tmp_path, 1, "save-unsharded", ckpt, tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    assert saved["absmax_local_shape"] == (40, 2)  # the plain param's layout is the sharded one's
    _torchrun(tmp_path, 2, "load", ckpt, tmp_path / "loaded.pt")
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    for key in ("state1", "absmax1"):
        assert torch.equal(loaded["loaded_state"][key], saved["saved_state"][key]), key
    for a, b in zip(loaded["params"], saved["params"]):  # two ranks sum the batch in two halves
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_8bit_state_takes_about_one_byte_per_param_on_disk(tmp_path):
    """dcp.save of SGD8bit's state for 1M params: codes (1 B/param), absmax (4 B per 256-element block)
    and one 1 KiB codebook; SGD32bit's momentum takes 4 B/param. Measured on the checkpoint's data files."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def bytes_per_param(cls, name):
        model = torch.nn.Linear(1024, 1024, bias=False)
        opt = cls(model.parameters(), lr=0.1, momentum=0.9)
        model.weight.grad = torch.randn(1024, 1024)
        opt.step()
        directory = tmp_path / name
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(directory), no_dist=True)
        data = sum(os.path.getsize(directory / f) for f in os.listdir(directory) if f != ".metadata")
        return data / model.weight.numel()

    eight_bit, fp32 = bytes_per_param(torchsgd8.SGD8bit, "sgd8bit"), bytes_per_param(torchsgd8.SGD32bit, "sgd32bit")
    assert 1.0 < eight_bit < 1.05, eight_bit  # 1 + 4/256, the codebook and DCP framing (measured 1.035)
    assert 4.0 < fp32 < 4.03, fp32  # measured 4.014
