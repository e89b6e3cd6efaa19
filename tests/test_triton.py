"""The Triton kernels (torchsgd8/triton) against the C++ CPU kernels, bit for bit.

Each launcher of torchsgd8.triton.launch gets the same inputs as the CPU public op (torch.ops.torchsgd8.*),
and params, momentum buffers, codes and absmax must come out with the same bits. Without a CUDA device the
kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before triton is imported) on
CPU tensors; with one, on the GPU, against the CPU kernels on copies.

What the interpreter evaluates as a GPU does: tl.fma with one rounding in float32 and float64, tl.math.div_rn
as IEEE division (test_interpreter_numerics_*), float32 -> float16 and float64 -> float32 rounded to nearest
even (numpy's conversions). What it does not, so the kernels avoid it: Triton's float32 `/` (IEEE here,
approximate on NVIDIA GPUs) and bfloat16 conversions (truncation and wrong subnormals here; the kernels convert
through the bits, test_bfloat16_conversions_are_torchs). test_gpu_code_* compiles the kernels for sm_90 and
checks that the GPU code uses the operations the interpreter emulates.

NaN payloads are not compared for params and buffers (positions are): x86 and numpy propagate an input's
payload through whichever operand order their instructions have, GPUs produce a canonical NaN, and even the CPU
kernels' own bfloat16 NaN bits differ between their SIMD and scalar loops. absmax NaNs are canonical
(0x7fc00000) and compared bit for bit, like everything else.

The launchers' contract is the kernel ops': on a first step that is skipped (found_inf) or has a momentum
value of 0, the public op also zeroes the state, which the contract layer does before calling the kernel, so
there the tests check that the kernel writes nothing (test_skipped_step_writes_nothing,
test_momentum_value_0_on_a_first_step).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchsgd8  # noqa: F401  (registers torch.ops.torchsgd8)
from quant_reference import tables
from torchsgd8.quantization import BLOCK_SIZE, ZERO_CODE, signed_dynamic_map

OPS = torch.ops.torchsgd8
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    # conftest.py sets it before anything imports triton (triton reads it then, and at every launch)
    pytest.skip("no GPU, and TRITON_INTERPRET is not 1", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed (requirements-dev.txt pins triton==3.9.0)")
from torchsgd8.triton import kernels, launch  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# The interpreter evaluates NaN and inf inputs with numpy, which warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:(overflow|invalid value|divide by zero) encountered:RuntimeWarning")

HYPOTHESIS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

UPDATE_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
STATE8_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = (0, 1, 255, 256, 257, 4097)
# flat (1-D) and per-row (2-D: absmax (rows, blocks per row)) layouts: rows shorter than a block, longer and
# not a multiple of it, whole multiples, one row, no rows
SHAPES_8BIT = [(0,), (1,), (255,), (256,), (257,), (4097,), (3, 100), (2, 300), (2, 512), (5, 257), (1, 1000),
               (0, 300)]


def _dtype_id(dtype) -> str:
    return str(dtype).split(".")[-1]


def _int_view(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, what
    differ = _int_view(got) != _int_view(want)
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {want.numel()} differ, first at "
                              f"{int(differ.nonzero()[0])}: {got.reshape(-1)[differ][:4].tolist()} vs "
                              f"{want.reshape(-1)[differ][:4].tolist()}")


def assert_same_values(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Bitwise equal, except that NaNs only have to be NaNs in the same places."""
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, what
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN positions differ"
    assert_same_bits(torch.where(nan, 0, got), torch.where(nan, 0, want), what)


def _on_device(tensors):
    """Copies for the launcher (on CPU too: the inputs must stay as they were, for the CPU op and the checks)."""
    return [t.to(DEVICE, copy=True) for t in tensors]


def _awkward_values(n: int, gen: torch.Generator) -> torch.Tensor:
    """Normal values spread over several orders of magnitude."""
    return torch.randn(n, generator=gen) * torch.exp2(torch.randint(-8, 4, (n,), generator=gen).float())


# ---- the update ops -----------------------------------------------------------------------------------------

DEFAULT_HYPER = dict(lr=0.0123, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False,
                     first_step=False, grad_scale=None, found_inf=None, rounding_seed=None,
                     hyper_dtype=torch.float64)
UPDATE_CONFIGS = {
    "momentum": dict(),
    "first_step": dict(first_step=True),
    "nesterov": dict(nesterov=True, dampening=0.0),
    "maximize_dampening": dict(maximize=True, dampening=0.5),
    "no_weight_decay": dict(weight_decay=0.0),
    "grad_scale": dict(grad_scale=4.0, found_inf=0.0),
    "float32_hyperparameters": dict(hyper_dtype=torch.float32, weight_decay=0.3),  # lr, momentum of shape (1,)
    "momentum_value_0": dict(momentum=0.0),
    # nonzero in float64, 0 in float32: momentum is in use, as the CPU kernels decide on the value read
    "momentum_below_float32": dict(momentum=1e-50, nesterov=True, dampening=0.0),
}


def _hyper_args(cfg: dict) -> tuple:
    h = {**DEFAULT_HYPER, **cfg}
    scalar = lambda v, dtype=torch.float32: None if v is None else torch.tensor(v, dtype=dtype)  # noqa: E731
    shape = () if h["hyper_dtype"] == torch.float64 else (1,)
    positional = (torch.full(shape, h["lr"], dtype=h["hyper_dtype"]),
                  torch.full(shape, h["momentum"], dtype=h["hyper_dtype"]),
                  h["dampening"], h["weight_decay"], h["nesterov"], h["maximize"], h["first_step"])
    keywords = dict(grad_scale=scalar(h["grad_scale"]), found_inf=scalar(h["found_inf"]),
                    rounding_seed=scalar(h["rounding_seed"], torch.int64))
    return positional, keywords


def _run_sgd_update(params, grads, bufs, cfg):
    """(CPU op's params and buffers, the launcher's), from the same inputs."""
    positional, keywords = _hyper_args(cfg)
    want = [[t.clone() for t in params], [t.clone() for t in bufs]]
    OPS.sgd_update_(want[0], grads, want[1], *positional, **keywords)
    got = [_on_device(params), _on_device(bufs)]
    launch.sgd_update(got[0], _on_device(grads), got[1], *positional, **keywords)
    return want, got


def _update_inputs(dtype, gen, sizes=SIZES, buffers=True):
    params = [_awkward_values(n, gen).to(dtype) for n in sizes]
    grads = [_awkward_values(n, gen).to(dtype) for n in sizes]
    bufs = [_awkward_values(n, gen).to(dtype) for n in sizes] if buffers else []
    return params, grads, bufs


@pytest.mark.parametrize("config", list(UPDATE_CONFIGS) + ["no_momentum_buffers"])
@pytest.mark.parametrize("dtype", UPDATE_DTYPES, ids=_dtype_id)
def test_sgd_update_matches_cpu(dtype, config, gen):
    buffers = config != "no_momentum_buffers"
    cfg = UPDATE_CONFIGS[config] if buffers else dict(momentum=0.0)
    params, grads, bufs = _update_inputs(dtype, gen, buffers=buffers)
    (want_p, want_b), (got_p, got_b) = _run_sgd_update(params, grads, bufs, cfg)
    for i, (got, want) in enumerate(zip(got_p + got_b, want_p + want_b)):
        assert_same_bits(got, want, f"tensor {i}")
    changed = [not torch.equal(p, q) for p, q in zip(want_p, params)]
    assert any(changed), "the reference did not update (a vacuous comparison)"


def _state_8bit(shape, gen, dtype=torch.float32):
    """A param, grad and an 8-bit state (codes, absmax) of a later step: the state quantizes random values;
    the layout is per row for 2-D shapes."""
    numel = torch.Size(shape).numel()
    param = _awkward_values(numel, gen).reshape(shape).to(dtype)
    grad = _awkward_values(numel, gen).reshape(shape).to(dtype)
    codes, absmax = OPS.quantize_blockwise(_awkward_values(numel, gen).reshape(shape), len(shape) == 2)
    return param, grad, codes, absmax


def _run_sgd8bit_update(params, grads, codes, absmax, cfg):
    positional, keywords = _hyper_args(cfg)
    want = [[t.clone() for t in ts] for ts in (params, codes, absmax)]
    OPS.sgd8bit_update_(want[0], grads, want[1], want[2], *positional, **keywords)
    got = [_on_device(ts) for ts in (params, codes, absmax)]
    launch.sgd8bit_update(got[0], _on_device(grads), got[1], got[2], *positional, **keywords)
    return want, got


def _assert_8bit_results(want, got):
    for i in range(len(want[0])):
        assert_same_values(got[0][i], want[0][i], f"param {i}")
        assert_same_bits(got[1][i], want[1][i], f"codes {i}")
        assert_same_bits(got[2][i], want[2][i], f"absmax {i}")


UPDATE_CONFIGS_8BIT = {**UPDATE_CONFIGS, "first_step_momentum_value_0": dict(first_step=True, momentum=0.0)}


@pytest.mark.parametrize("config", list(UPDATE_CONFIGS_8BIT))
@pytest.mark.parametrize("dtype", STATE8_DTYPES, ids=_dtype_id)
def test_sgd8bit_update_matches_cpu(dtype, config, gen):
    """One call over flat and per-row tensors of every kind of size."""
    states = [_state_8bit(shape, gen, dtype) for shape in SHAPES_8BIT]
    params, grads, codes, absmax = (list(ts) for ts in zip(*states))
    if UPDATE_CONFIGS_8BIT[config].get("first_step"):
        for t in codes + absmax:
            t.view(torch.uint8).fill_(0xFF)  # output only: garbage must not matter
    want, got = _run_sgd8bit_update(params, grads, codes, absmax, UPDATE_CONFIGS_8BIT[config])
    _assert_8bit_results(want, got)
    assert not torch.equal(want[0][5], params[5]), "the reference did not update (a vacuous comparison)"


@pytest.mark.parametrize("which", ["sgd_update", "sgd8bit_update"])
@pytest.mark.parametrize("first_step", [False, True], ids=["later", "first"])
def test_skipped_step_writes_nothing(which, first_step, gen):
    """found_inf nonzero: nothing at all is written, not even a first step's state (the contract zeroes it)."""
    if which == "sgd_update":
        params, grads, state = _update_inputs(torch.float32, gen)
        state = [state]
    else:
        params, grads, codes, absmax = (list(ts) for ts in zip(*[_state_8bit(s, gen) for s in SHAPES_8BIT]))
        state = [codes, absmax]
    grads[2][0] = float("inf")
    if first_step:
        for t in sum(state, []):
            t.view(torch.uint8).fill_(0xFF)
    before = [[t.clone() for t in ts] for ts in [params, grads, *state]]
    positional, keywords = _hyper_args(dict(first_step=first_step, grad_scale=65536.0, found_inf=1.0))
    tensors = [_on_device(ts) for ts in [params, grads, *state]]
    getattr(launch, which)(*tensors[:2], *tensors[2:], *positional, **keywords)
    for ts, ts_before in zip(tensors, before):
        for t, t_before in zip(ts, ts_before):
            assert_same_bits(t, t_before)
    # the same call with found_inf == 0 writes (so the check above is not vacuous)
    keywords["found_inf"] = torch.tensor(0.0)
    getattr(launch, which)(*tensors[:2], *tensors[2:], *positional, **keywords)
    assert not torch.equal(tensors[0][5].cpu(), before[0][5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_momentum_value_0_on_a_first_step(dtype, gen):
    """sgd_update with buffers and a momentum value of 0 never touches them (the contract zeroes them on a first
    step); the params get plain SGD, as from the CPU op."""
    params, grads, bufs = _update_inputs(dtype, gen)
    for b in bufs:
        b.view(torch.uint8).fill_(0xFF)
    (want_p, want_b), (got_p, got_b) = _run_sgd_update(params, grads, bufs, dict(first_step=True, momentum=0.0))
    for i, (got, want) in enumerate(zip(got_p, want_p)):
        assert_same_bits(got, want, f"param {i}")
    for got, before in zip(got_b, bufs):
        assert_same_bits(got, before, "buffer")
    assert all(bool((b == 0).all()) for b in want_b)  # what the contract writes


SEEDS = [0, 12345, -1, 2**40 + 7]  # -1 and 2**40 + 7: seeds with high bits, which the noise hashes too


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("config", ["momentum", "first_step", "no_momentum_buffers", "8bit", "8bit_first_step"])
def test_stochastic_rounding_matches_cpu(config, seed, gen):
    cfg = dict(rounding_seed=seed, first_step=config.endswith("first_step"))
    if config.startswith("8bit"):
        states = [_state_8bit(shape, gen, torch.bfloat16) for shape in SHAPES_8BIT]
        params, grads, codes, absmax = (list(ts) for ts in zip(*states))
        want, got = _run_sgd8bit_update(params, grads, codes, absmax, cfg)
        _assert_8bit_results(want, got)
        return
    if config == "no_momentum_buffers":
        cfg["momentum"] = 0.0
    params, grads, bufs = _update_inputs(torch.bfloat16, gen, buffers=config != "no_momentum_buffers")
    (want_p, want_b), (got_p, got_b) = _run_sgd_update(params, grads, bufs, cfg)
    for i, (got, want) in enumerate(zip(got_p + got_b, want_p + want_b)):
        assert_same_bits(got, want, f"tensor {i}")
    # not round to nearest: some params differ from the nearest rounding of the same update
    (nearest_p, _), _ = _run_sgd_update(params, grads, bufs, {**cfg, "rounding_seed": None})
    assert any(not torch.equal(a, b) for a, b in zip(nearest_p, want_p))


def _with_specials(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """t with NaN, +-inf, subnormal, +-0 values at random places."""
    flat = t.reshape(-1).clone()
    if flat.numel():
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-40, -3e-42, 0.0, -0.0])
        where = torch.randint(0, flat.numel(), (min(12, flat.numel()),), generator=gen)
        flat[where] = specials[torch.randint(0, len(specials), (len(where),), generator=gen)].to(t.dtype)
    return flat.reshape(t.shape)


@pytest.mark.parametrize("dtype", UPDATE_DTYPES, ids=_dtype_id)
def test_nan_and_inf_grads(dtype, gen):
    params, grads, bufs = _update_inputs(dtype, gen)
    grads = [_with_specials(g, gen) for g in grads]
    for cfg in (dict(), dict(nesterov=True, dampening=0.0, maximize=True), dict(first_step=True)):
        (want_p, want_b), (got_p, got_b) = _run_sgd_update(params, grads, bufs, cfg)
        for i, (got, want) in enumerate(zip(got_p + got_b, want_p + want_b)):
            assert_same_values(got, want, f"tensor {i}")
        assert any(bool(p.isnan().any()) for p in want_p)
    if dtype == torch.float64:
        return
    states = [_state_8bit(shape, gen, dtype) for shape in SHAPES_8BIT]
    params, grads, codes, absmax = (list(ts) for ts in zip(*states))
    grads = [_with_specials(g, gen) for g in grads]
    absmax[7][1, 0] = float("inf")  # a stored absmax that is itself not finite
    absmax[8][0, 1] = float("nan")
    for cfg in (dict(), dict(first_step=True, weight_decay=0.0)):
        want, got = _run_sgd8bit_update(params, grads, codes, absmax, cfg)
        _assert_8bit_results(want, got)
        assert any(bool(a.isnan().any()) for a in want[2])


def test_one_launch_for_a_200_tensor_bucket_and_the_tables_are_reused(gen, monkeypatch):
    """A call is one launch whatever its tensors; the second call with the same tensors builds and copies
    nothing (the tables are the cached ones), and its results are the CPU kernels' as well."""
    sizes = torch.randint(1, 300, (200,), generator=gen).tolist()
    shapes = [(n,) if i % 3 else (2, n) for i, n in enumerate(sizes)]
    states = [_state_8bit(shape, gen) for shape in shapes]
    params, grads, codes, absmax = (list(ts) for ts in zip(*states))
    launch._plans.clear()  # a key of freed tensors could match these (same addresses and shapes)
    launches = []
    kernel = launch.kernels.sgd8bit_update_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(launch.kernels, "sgd8bit_update_kernel", Counting())
    built = []
    build_plan = launch._build_plan
    monkeypatch.setattr(launch, "_build_plan", lambda *a, **k: built.append(1) or build_plan(*a, **k))
    want_state = [params, codes, absmax]
    got_state = [_on_device(ts) for ts in want_state]
    got_grads = _on_device(grads)
    for step in range(2):
        want_state = [[t.clone() for t in ts] for ts in want_state]
        positional, keywords = _hyper_args(dict(first_step=step == 0))
        OPS.sgd8bit_update_(want_state[0], grads, want_state[1], want_state[2], *positional, **keywords)
        launch.sgd8bit_update(got_state[0], got_grads, got_state[1], got_state[2], *positional, **keywords)
        _assert_8bit_results(want_state, got_state)
        assert len(launches) == step + 1 and len(built) == 1
    blocks = [(s[0] if len(s) == 2 else 1) * -(-s[-1] // BLOCK_SIZE) for s in shapes]  # per row for 2-D shapes
    assert launches[0] == launches[1] == (sum(-(-b // launch.BLOCKS_PER_PROGRAM) for b in blocks),)
    # other tensors (new addresses) get tables of their own (a skipped step: only the tables matter here)
    other = [p.clone() for p in got_state[0]]
    keywords["found_inf"] = torch.tensor(1.0)
    launch.sgd8bit_update(other, got_grads, got_state[1], got_state[2], *positional, **keywords)
    assert len(built) == 2 and len(launches) == 3


def test_table_cache_evicts_the_least_recently_used_and_keeps_what_a_graph_captured():
    cache = launch._LruCache(2)
    builds = []

    def get(key, keep=False):
        return cache.get(key, lambda: builds.append(key) or key.upper(), keep)

    assert [get("a"), get("b"), get("a"), get("c")] == ["A", "B", "A", "C"]  # c evicts b, the least recent
    assert builds == ["a", "b", "c"]
    get("a")
    get("b")
    assert builds == ["a", "b", "c", "b"] and len(cache) == 2
    get("captured", keep=True)  # built while a CUDA graph was being captured: never evicted
    get("a", keep=True)  # already cached: kept from now on
    for key in "defgh":
        get(key)
    get("captured")
    get("a")
    assert builds == ["a", "b", "c", "b", "captured", *"defgh"]


def test_tables_of_tensors_with_more_than_2_31_elements():
    """The work split in 64-bit arithmetic: a tensor of 3 * 2**31 + 5 elements, beside small ones."""
    huge = 3 * 2**31 + 5
    entries = [launch._TensorEntry(16, 32, 48, 64, n, n) for n in (5, huge, 0, 300)]
    plan = launch._build_plan(torch.device("cpu"), entries, blockwise=True, block_size=BLOCK_SIZE)
    table = plan.tensor_table
    blocks = [-(-n // BLOCK_SIZE) for n in (5, huge, 0, 300)]
    units = [-(-b // launch.BLOCKS_PER_PROGRAM) for b in blocks]
    assert table[:, kernels.NUM_BLOCKS.value].tolist() == blocks
    assert table[:, kernels.REGULAR_BLOCKS.value].tolist() == [0, huge // BLOCK_SIZE, 0, 1]
    assert table[:, kernels.FIRST_PROGRAM.value].tolist() == [0, units[0], sum(units[:2]), sum(units[:2])]
    assert plan.num_programs == sum(units) and plan.program_tensor.dtype == torch.int32
    assert torch.equal(plan.program_tensor.bincount(), torch.tensor(units))
    assert plan.aligned
    misaligned = launch._build_plan(torch.device("cpu"), [launch._TensorEntry(16, 36, 48, 64, 7, 7)],
                                    blockwise=False, block_size=0)
    assert not misaligned.aligned and misaligned.num_programs == 1


def _launch_window(kernel_launch, row: list, units: range, **flags):
    """Runs a kernel on units [units.start, units.stop) of a tensor described by `row` (a table row whose
    FIRST_PROGRAM is set so that program 0 gets unit units.start)."""
    row = list(row)
    row[kernels.FIRST_PROGRAM.value] = -units.start
    table = torch.tensor([row], dtype=torch.int64).to(DEVICE)
    program_tensor = torch.zeros(len(units), dtype=torch.int32, device=DEVICE)
    kernel_launch[(len(units),)](table, program_tensor, **flags)


def test_element_offsets_past_2_31_in_the_kernels(gen):
    """The kernels' offsets in 64-bit arithmetic: real tensors described as the end of tensors of more than
    2**32 elements (their addresses moved back by that many elements), so only the programs of their last units
    run, with unit, block and element indexes past 2**31. (The interpreter's int32 arithmetic wraps as a
    GPU's does, so an int32 offset would show.)"""
    n = 3000
    skip = 2**32  # elements before the real data: a multiple of every unit
    param, grad, buf = (_awkward_values(n, gen) for _ in range(3))
    positional, keywords = _hyper_args(dict())
    want_p, want_b = param.clone(), buf.clone()
    OPS.sgd_update_([want_p], [grad], [want_b], *positional, **keywords)
    got_p, got_g, got_b = _on_device([param, grad, buf])
    row = [got_p.data_ptr() - 4 * skip, got_g.data_ptr() - 4 * skip, got_b.data_ptr() - 4 * skip, 0, skip + n,
           skip + n, 0, 0, 0, 0]
    first = skip // launch.UPDATE_CHUNK
    constants = launch._rule_constants(got_p.device, DEFAULT_HYPER["dampening"], DEFAULT_HYPER["weight_decay"])
    _launch_window(kernels.sgd_update_kernel, row, range(first, first + -(-n // launch.UPDATE_CHUNK)),
                   lr_ptr=positional[0].to(DEVICE), momentum_ptr=positional[1].to(DEVICE), constants_ptr=constants,
                   grad_scale_ptr=None, found_inf_ptr=None, seed_ptr=None, STORAGE=tl.float32, ACC=tl.float32,
                   HAS_MOMENTUM=True, MAXIMIZE=False, WEIGHT_DECAY=True, FIRST_STEP=False, NESTEROV=False,
                   ALIGNED=False, UPDATE_CHUNK=launch.UPDATE_CHUNK)
    assert_same_bits(got_p, want_p)
    assert_same_bits(got_b, want_b)

    # 8-bit, per row: 2**23 rows of 300 elements (2 blocks each) before the 10 real rows
    rows, row_length, blocks_per_row = 10, 300, 2
    skip_rows = 2**23
    param, grad, codes, absmax = _state_8bit((rows, row_length), gen)
    want = [[param.clone()], [codes.clone()], [absmax.clone()]]
    OPS.sgd8bit_update_(want[0], [grad], want[1], want[2], *positional, **keywords)
    got_p, got_g, got_c, got_a = _on_device([param, grad, codes, absmax])
    skip = skip_rows * row_length
    skip_blocks = skip_rows * blocks_per_row
    total_blocks = skip_blocks + rows * blocks_per_row
    row = [got_p.data_ptr() - 4 * skip, got_g.data_ptr() - 4 * skip, got_c.data_ptr() - skip,
           got_a.data_ptr() - 4 * skip_blocks, skip + rows * row_length, row_length, blocks_per_row, total_blocks,
           row_length // BLOCK_SIZE, 0]
    codec = launch._codec(got_p.device)
    first = skip_blocks // launch.BLOCKS_PER_PROGRAM
    _launch_window(kernels.sgd8bit_update_kernel, row,
                   range(first, -(-total_blocks // launch.BLOCKS_PER_PROGRAM)),
                   qmap=codec.qmap, bucket_table=codec.bucket_table, lr_ptr=positional[0].to(DEVICE),
                   momentum_ptr=positional[1].to(DEVICE), constants_ptr=constants, grad_scale_ptr=None,
                   found_inf_ptr=None, seed_ptr=None, STORAGE=tl.float32, MAXIMIZE=False, WEIGHT_DECAY=True,
                   FIRST_STEP=False, NESTEROV=False, ALIGNED=False, **launch._codec_flags(codec))
    _assert_8bit_results(want, [[got_p], [got_c], [got_a]])


# ---- quantize / dequantize ------------------------------------------------------------------------------------

QUANT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
QUANT_SHAPES = [(0,), (1,), (255,), (256,), (257,), (4097,), (3, 100), (2, 300), (2, 512), (0, 7)]


def _quantize_both(values: torch.Tensor, per_row: bool):
    want_codes, want_absmax = OPS.quantize_blockwise(values, per_row)
    codes = torch.full(values.shape, 0xAB, dtype=torch.uint8, device=DEVICE)
    absmax = torch.full(want_absmax.shape, -7.0, device=DEVICE)
    launch.quantize_blockwise(values.to(DEVICE), codes, absmax)
    return (want_codes, want_absmax), (codes, absmax)


@pytest.mark.parametrize("dtype", QUANT_DTYPES, ids=_dtype_id)
def test_quantize_blockwise_matches_cpu(dtype, gen):
    for shape in QUANT_SHAPES:
        values = _with_specials(_awkward_values(torch.Size(shape).numel(), gen).reshape(shape), gen).to(dtype)
        if values.numel() > 600:
            values.view(-1)[256:512] = 0  # an all-zero block: absmax 0, zero codes
            values.view(-1)[512:768] *= 1e-39  # subnormal quotients
        for per_row in ([False, True] if len(shape) == 2 else [False]):
            (want_codes, want_absmax), (codes, absmax) = _quantize_both(values, per_row)
            assert_same_bits(codes, want_codes, f"codes of {shape}")
            assert_same_bits(absmax, want_absmax, f"absmax of {shape}")


@pytest.mark.parametrize("dtype", QUANT_DTYPES, ids=_dtype_id)
def test_dequantize_blockwise_matches_cpu(dtype, gen):
    for shape in QUANT_SHAPES:
        for per_row in ([False, True] if len(shape) == 2 else [False]):
            codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
            _, absmax = OPS.quantize_blockwise(torch.zeros(shape), per_row)
            absmax = _with_specials(torch.rand(absmax.shape, generator=gen) * 10, gen).abs()
            want = OPS.dequantize_blockwise(codes, absmax, dtype)
            out = torch.full(shape, 3.0, dtype=dtype, device=DEVICE)
            launch.dequantize_blockwise(codes.to(DEVICE), absmax.to(DEVICE), out)
            assert_same_values(out, want, f"{shape}, per_row={per_row}")


# ---- property tests -----------------------------------------------------------------------------------------

THRESHOLDS = tables.positive_thresholds(signed_dynamic_map().numpy())[:-1]
# float32 values at and next to the midpoints between codes (ties go to the smaller magnitude), the codes
# themselves, and subnormals
TIES = np.concatenate([THRESHOLDS, np.nextafter(THRESHOLDS, np.float32(np.inf)), signed_dynamic_map().numpy(),
                       np.float32([1e-45, 3e-42, 1.1754942e-38, 0.0])]).astype(np.float32)


@st.composite
def blockwise_values(draw):
    """(values as float32, per_row): random shapes and layouts; values mostly ties at code midpoints scaled by a
    power of two per tensor (so v / absmax hits them exactly where absmax is that power of two), with random
    normals, subnormals and an exact absmax in each block."""
    per_row = draw(st.booleans())
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 700))) if per_row else (draw(st.integers(0, 1200)),)
    numel = int(np.prod(shape))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = np.float32(2.0 ** draw(st.integers(-140, 100)))
    ties = rng.choice(TIES, numel) * rng.choice(np.float32([-1, 1]), numel)
    normal = rng.standard_normal(numel).astype(np.float32)
    values = np.where(rng.random(numel) < 0.8, ties, normal).astype(np.float32)
    values[::BLOCK_SIZE] = 1.0  # absmax exactly `scale` in most blocks
    return torch.from_numpy(values * scale).reshape(shape), per_row


@settings(max_examples=40, **HYPOTHESIS)
@given(case=blockwise_values(), dtype=st.sampled_from(QUANT_DTYPES))
def test_property_quantize_and_dequantize_match_cpu(case, dtype):
    values, per_row = case
    values = values.to(dtype)
    (want_codes, want_absmax), (codes, absmax) = _quantize_both(values, per_row)
    assert_same_bits(codes, want_codes, "codes")
    assert_same_bits(absmax, want_absmax, "absmax")
    for out_dtype in (dtype, torch.float32):
        want = OPS.dequantize_blockwise(want_codes, want_absmax, out_dtype)
        out = torch.empty(values.shape, dtype=out_dtype, device=DEVICE)
        launch.dequantize_blockwise(codes, absmax, out)
        assert_same_values(out, want, "dequantized")


@st.composite
def update_8bit_cases(draw):
    dtype = draw(st.sampled_from(STATE8_DTYPES))
    count = draw(st.integers(1, 3))
    tensors = []
    for _ in range(count):
        values, per_row = draw(blockwise_values())
        grad, _ = draw(blockwise_values())
        grad = grad.reshape(-1)[:values.numel()]
        grad = torch.cat([grad, torch.zeros(values.numel() - grad.numel())]).reshape(values.shape)
        param = values.flip(-1) if values.dim() else values
        codes, absmax = OPS.quantize_blockwise(values, per_row)
        tensors.append((param.to(dtype), grad.to(dtype), codes, absmax))
    cfg = dict(lr=draw(st.sampled_from([0.0, 1e-3, 0.1, 1.7])),
               momentum=draw(st.sampled_from([0.0, 0.5, 0.9, 0.99])),
               weight_decay=draw(st.sampled_from([0.0, 1e-4, 0.1])),
               maximize=draw(st.booleans()), first_step=draw(st.booleans()),
               grad_scale=draw(st.sampled_from([None, 1.0, 1024.0, 3.0])),
               hyper_dtype=draw(st.sampled_from([torch.float64, torch.float32])))
    nesterov = draw(st.booleans()) and cfg["momentum"] > 0
    cfg.update(nesterov=nesterov, dampening=0.0 if nesterov else draw(st.sampled_from([0.0, 0.1, 0.9])))
    if dtype == torch.bfloat16 and draw(st.booleans()):
        cfg["rounding_seed"] = draw(st.integers(-2**63, 2**63 - 1))
    return tensors, cfg


@settings(max_examples=40, **HYPOTHESIS)
@given(case=update_8bit_cases())
def test_property_sgd8bit_update_matches_cpu(case):
    tensors, cfg = case
    params, grads, codes, absmax = (list(ts) for ts in zip(*tensors))
    want, got = _run_sgd8bit_update(params, grads, codes, absmax, cfg)
    _assert_8bit_results(want, got)


# ---- the interpreter's numerics, the GPU code, the import ----------------------------------------------------


@triton.jit
def _fma_kernel(a, b, c, out, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(a + offsets, mask=mask)
    y = tl.load(b + offsets, mask=mask)
    z = tl.load(c + offsets, mask=mask)
    tl.store(out + offsets, tl.fma(x, y, z), mask=mask)


@triton.jit
def _div_kernel(a, b, out, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out + offsets, tl.math.div_rn(tl.load(a + offsets, mask=mask), tl.load(b + offsets, mask=mask)),
             mask=mask)


def _run_elementwise(kernel, *tensors):
    out = torch.empty_like(tensors[0])
    n = out.numel()
    kernel[(triton.cdiv(n, 1024),)](*tensors, out, n, BLOCK=1024)
    return out


@pytest.mark.skipif(DEVICE != "cpu", reason="checks Triton's interpreter")
def test_interpreter_numerics_fma_rounds_once():
    """tl.fma rounds once in float32 and float64 (the interpreter's fma_fp32/fma_fp64), also where computing it in
    float64 and rounding to float32 would round twice: (1 + 2**-23) * 2**-24 (1 - 2**-23) + (1 + 2**-23) is just
    below the tie 1 + 2**-23 + 2**-24 (exactly, 2**-70 below), which float64 rounds onto the tie."""
    one_ulp = 2.0**-23
    a = torch.tensor([1 + one_ulp, 3.0, 1e30], dtype=torch.float32)
    b = torch.tensor([2.0**-24 * (1 - one_ulp), 1 / 3, 1e10], dtype=torch.float32)
    c = torch.tensor([1 + one_ulp, -1.0, -float("inf")], dtype=torch.float32)
    got = _run_elementwise(_fma_kernel, a, b, c)
    assert got[0].item() == 1 + one_ulp  # float64 then float32 would give 1 + 2**-22
    assert got[1].item() == float(np.float32(np.float64(np.float32(3.0)) * np.float64(np.float32(1 / 3)) - 1.0))
    assert got[2].item() == -float("inf")
    # float64: (1 + 2**-52)(1 - 2**-52) - 1 = -2**-104 exactly, which a multiply then add rounds to 0
    a, b, c = (torch.tensor(v, dtype=torch.float64) for v in ([1 + 2.0**-52], [1 - 2.0**-52], [-1.0]))
    assert _run_elementwise(_fma_kernel, a, b, c).item() == -(2.0**-104)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks Triton's interpreter")
def test_interpreter_numerics_division(gen):
    """tl.math.div_rn is IEEE float32 division (numpy's), subnormals and overflow included."""
    x = torch.randn(10000, generator=gen) * torch.exp2(torch.randint(-140, 120, (10000,), generator=gen).float())
    y = torch.randn(10000, generator=gen) * torch.exp2(torch.randint(-140, 120, (10000,), generator=gen).float())
    assert_same_values(_run_elementwise(_div_kernel, x, y), x / y)


@triton.jit
def _bfloat16_round_trip_kernel(values, bits, back, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(bits + offsets, kernels._bfloat16_bits(tl.load(values + offsets, mask=mask)), mask=mask)
    tl.store(back + offsets, kernels._load_float(bits, offsets, mask, tl.float32), mask=mask)


def test_bfloat16_conversions_are_torchs():
    """The kernels' bfloat16 conversions (through the bits) against torch's, on every bfloat16 and on floats
    with every upper half and rounding-critical lower halves (ties, just above and below, subnormals, inf, NaN).
    Triton's interpreter itself converts float32 to bfloat16 by truncation and turns bfloat16 subnormals into
    other values, unlike the GPU, so the kernels do not use its conversions."""
    upper = torch.arange(0, 1 << 16, dtype=torch.int64) << 16
    lower = torch.tensor([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234, 0xC000], dtype=torch.int64)
    values = (upper[:, None] | lower[None, :]).reshape(-1).to(torch.int32).view(torch.float32).to(DEVICE)
    bits = torch.empty(values.shape, dtype=torch.uint16, device=DEVICE)
    back = torch.empty_like(values)
    n = values.numel()
    _bfloat16_round_trip_kernel[(triton.cdiv(n, 4096),)](values, bits, back, n, BLOCK=4096)
    want = values.cpu().to(torch.bfloat16)
    assert_same_values(bits.cpu().view(torch.bfloat16), want)
    assert_same_values(back, want.float())


# The GPU code: the kernels compiled for sm_90 in a subprocess (without TRITON_INTERPRET; no GPU needed: triton
# bundles ptxas), for the specialisations the launchers use, and the PTX instructions that decide the numerics
# and the width of the memory accesses.
_PTX_SCRIPT = r"""
import json, re, sys
import torch, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from torchsgd8.triton import kernels as K, launch

def ptx(fn, pointers, constants, num_warps):
    signature = {**pointers, **{name: "constexpr" for name in constants}}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, enable_fp_fusion=False))
    return kernel.asm["ptx"]

codec = launch._codec_flags(launch._codec(torch.device("cpu")))
tables = {"tensor_table": "*i64", "program_tensor": "*i32"}
amp = {"grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
rule = {"lr_ptr": "*fp64", "momentum_ptr": "*fp64", "constants_ptr": "*fp64"}
no_amp = dict(grad_scale_ptr=None, found_inf_ptr=None)
flags = dict(MAXIMIZE=False, WEIGHT_DECAY=True, FIRST_STEP=False, NESTEROV=True, ALIGNED=True)
seed = {"seed_ptr": "*i64"}
chunk = dict(UPDATE_CHUNK=launch.UPDATE_CHUNK)
cases = {
    "sgd_update/float32": (K.sgd_update_kernel, {**tables, **rule, **amp},
                           dict(seed_ptr=None, STORAGE=tl.float32, ACC=tl.float32, HAS_MOMENTUM=True, **flags,
                                **chunk)),
    "sgd_update/float16-no-buffers": (K.sgd_update_kernel, {**tables, **rule},
                                      dict(seed_ptr=None, **no_amp, STORAGE=tl.float16, ACC=tl.float32,
                                           HAS_MOMENTUM=False, **flags, **chunk)),
    "sgd_update/bfloat16-stochastic": (K.sgd_update_kernel, {**tables, **rule, **seed},
                                       dict(**no_amp, STORAGE=tl.uint16, ACC=tl.float32, HAS_MOMENTUM=True,
                                            **{**flags, "FIRST_STEP": True}, **chunk)),
    "sgd_update/float64": (K.sgd_update_kernel, {**tables, **rule, **amp},
                           dict(seed_ptr=None, STORAGE=tl.float64, ACC=tl.float64, HAS_MOMENTUM=True, **flags,
                                **chunk)),
    "sgd8bit_update/float32": (K.sgd8bit_update_kernel,
                               {**tables, "qmap": "*fp32", "bucket_table": "*i32", **rule, **amp},
                               dict(seed_ptr=None, STORAGE=tl.float32, **flags, **codec)),
    "sgd8bit_update/float16": (K.sgd8bit_update_kernel, {**tables, "qmap": "*fp32", "bucket_table": "*i32", **rule},
                               dict(seed_ptr=None, **no_amp, STORAGE=tl.float16, **flags, **codec)),
    "sgd8bit_update/bfloat16-stochastic-first": (
        K.sgd8bit_update_kernel, {**tables, "qmap": "*fp32", "bucket_table": "*i32", **rule, **seed},
        dict(**no_amp, STORAGE=tl.uint16, **{**flags, "FIRST_STEP": True}, **codec)),
}
for name, storage in (("float32", tl.float32), ("bfloat16", tl.uint16), ("float64", tl.float64)):
    cases["quantize_blockwise/" + name] = (K.quantize_blockwise_kernel, {**tables, "bucket_table": "*i32"},
                                           dict(STORAGE=storage, ALIGNED=True, **codec))
for name, storage in (("float32", tl.float32), ("bfloat16", tl.uint16), ("float16", tl.float16),
                      ("float64", tl.float64)):
    cases["dequantize_blockwise/" + name] = (K.dequantize_blockwise_kernel, {**tables, "qmap": "*fp32"},
                                             dict(STORAGE=storage, ALIGNED=True, BLOCKS=codec["BLOCKS"],
                                                  BLOCK_SIZE=codec["BLOCK_SIZE"]))
pattern = r"\b(?:(?:div|rcp|fma|add|mul|sub|neg|cvt)\.[\w.]+|(?:ld|st)\.global[\w.]*)"
out = {}
for name, (fn, pointers, constants) in cases.items():
    warps = launch.UPDATE_WARPS if name.startswith("sgd_update") else launch.BLOCKWISE_WARPS
    out[name] = sorted(set(re.findall(pattern, ptx(fn, pointers, constants, warps))))
json.dump(out, sys.stdout)
"""


def test_gpu_code_uses_ieee_division_fused_multiply_add_and_wide_accesses():
    """What the interpreter cannot show: every specialisation compiles for an NVIDIA GPU (sm_90), and its code does
    the operations the interpreter emulates - IEEE division (div.rn, never Triton's default approximate float32
    division), fused multiply-adds rounding once (fma.rn), no flushing of subnormals (.ftz) - with vector
    accesses (16 bytes per thread for float32 params) in the regular units."""
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    instructions = json.loads(proc.stdout)
    for kernel, ops in instructions.items():
        float_ops = [op for op in ops if op.split(".")[0] in ("div", "rcp", "fma", "add", "mul", "sub", "neg")
                     and ".f" in op]
        assert not [op for op in float_ops if ".ftz" in op or ".approx" in op or ".full" in op], (kernel, float_ops)
        assert all(op.startswith("fma.rn.f") for op in ops if op.startswith("fma")), (kernel, ops)
        if kernel.startswith(("sgd_update", "sgd8bit_update")):
            assert any(op.startswith("fma.rn.f") for op in ops), (kernel, ops)
        if kernel.startswith(("sgd8bit", "quantize")) or kernel in ("sgd_update/float32", "sgd_update/float64"):
            assert any(op.startswith("div.rn.f") for op in ops), (kernel, ops)  # v / absmax, grads / grad_scale
        if not kernel.startswith("dequantize"):
            assert any(op.startswith("ld.global.v") for op in ops), (kernel, ops)
    assert "div.rn.f64" in instructions["sgd_update/float64"]
    for kernel in ("sgd_update/float32", "sgd8bit_update/float32"):
        assert {"ld.global.v4.b32", "st.global.v4.b32"} <= set(instructions[kernel]), (kernel, instructions[kernel])
    assert "st.global.v4.b32" in instructions["dequantize_blockwise/float32"]


def test_import_torchsgd8_does_not_import_triton():
    code = "import sys, torchsgd8, torchsgd8.triton; assert 'triton' not in sys.modules, 'triton was imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_quant_tables_are_the_cpu_kernels():
    """The one source of the codebook and bucket lookup: dequantizing every code with absmax 1 gives the map,
    and the lookup is the CPU kernels' nearest code (checked on every code and every midpoint)."""
    tables = launch.quant_tables()
    qmap = np.frombuffer(tables["signed_dynamic_map"], dtype=np.float32)
    assert len(qmap) == 256 and tables["block_size"] == BLOCK_SIZE and tables["zero_code"] == ZERO_CODE
    codes = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(OPS.dequantize_blockwise(codes, torch.ones(1), torch.float32), torch.from_numpy(qmap.copy()))
    values = torch.from_numpy(np.concatenate([TIES, -TIES]))
    values = torch.cat([values, torch.zeros(-len(values) % (BLOCK_SIZE - 1))]).reshape(-1, BLOCK_SIZE - 1)
    values = torch.cat([torch.ones(len(values), 1), values], dim=1).reshape(-1)  # absmax 1 in every block
    (want_codes, _), (got_codes, _) = _quantize_both(values, False)
    assert_same_bits(got_codes, want_codes)
