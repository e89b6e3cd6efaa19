"""Robustness: determinism, thread-count independence, the kernel sets of every instruction set (DEFAULT,
AVX2, AVX512) against each other, 64-bit sizes, and no memory growth over many steps.

  * the same run twice gives the same bits (fp32 and 8-bit state, bf16 stochastic rounding);
  * 1 and 2 intra-op threads give the same bits, with tensors big enough that the block ranges of the
    threads start inside tensors and span several tensors;
  * TORCHSGD8_CPU_ISA=default / avx2 / avx512 (read once per process, so in a subprocess) give the same
    8-bit codes and absmax as the kernels this process uses (the widest the CPU runs) for a large input
    full of special values (zeros, signed zeros, subnormals, inf, NaN, every rounding threshold and its
    float neighbours), and the same optimizer steps;
  * TORCHSGD8_CPU_PREFETCH=0 / 1 (the 8-bit kernels' software prefetch) and, for the AVX2 kernels,
    TORCHSGD8_CPU_GATHER=0 / 1 (table reads by gathers or scalar loads) give the same bits; an invalid
    value of any setting raises a RuntimeError at the first op, also from _C.cpu_isa() and the like;
  * sizes beyond 2**31: block counts, fake/meta shapes and the ops' argument checks at those sizes without
    touching memory; the real thing (a bf16 tensor of 2**31 + 300 elements) behind @pytest.mark.slow;
  * resident memory (/proc/self/statm) stays flat over 10,000 eager and 2,000 compiled steps.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch._dynamo

import torchsgd8
from torchsgd8 import _C, ops
from torchsgd8.quantization import BLOCK_SIZE, signed_dynamic_map

from quant_reference import nearest_code_reference, tables

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def bits_of(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    if t.is_complex():
        t = torch.view_as_real(t).reshape(-1)
    return t.view(torch.uint8)


# ---- a training run that exercises every kernel path ----------------------------------------------------

RUN_PARAMS = [  # (numel, dtype, group)
    (70_001, torch.float32, 0), (33_000, torch.float32, 0), (5, torch.float32, 0), (257, torch.float32, 0),
    (12_345, torch.bfloat16, 0),  # bf16 through the SIMD loads and stores (group 1 rounds stochastically)
    (40_123, torch.bfloat16, 1), (4_099, torch.bfloat16, 1), (20_000, torch.float16, 1),
    (30_000, torch.float32, 2), (513, torch.float64, 2), (0, torch.float32, 2), (1, torch.float32, 2),
    (3_001, torch.bfloat16, 2),
]
GROUPS = [
    dict(optim_bits=8, momentum=0.9, dampening=0.1, weight_decay=1e-3),
    dict(optim_bits=8, momentum=0.9, nesterov=True, stochastic_rounding=True),
    dict(optim_bits=32, momentum=0.8, weight_decay=1e-2, maximize=True),
]


def training_run(steps: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Params and every state tensor after `steps` steps, as a flat list."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(d).requires_grad_() for n, d, _ in RUN_PARAMS]
    torch.manual_seed(seed)  # the stochastic-rounding seed is drawn from the default generator
    groups = [dict(g, params=[p for p, (_, _, gi) in zip(params, RUN_PARAMS) if gi == i])
              for i, g in enumerate(GROUPS)]
    opt = torchsgd8.SGD(groups, lr=0.01, min_8bit_size=256)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for _, v in sorted(opt.state[p].items())]
    out += [g["rounding_seed"].clone() for g in opt.param_groups if "rounding_seed" in g]
    return out


def assert_same_bits(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    assert len(a) == len(b), what
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, (what, i)
        assert torch.equal(bits_of(x), bits_of(y)), f"{what}: tensor {i} ({x.dtype}{tuple(x.shape)}) differs"


def test_repeated_runs_are_bitwise_identical():
    first = training_run()
    second = training_run()
    assert_same_bits(first, second, "second run")
    # not vacuous: another seed changes the result
    assert not all(torch.equal(bits_of(x), bits_of(y)) for x, y in zip(first, training_run(seed=1)))


def test_one_and_two_threads_are_bitwise_identical(restore_threads):
    torch.set_num_threads(1)
    one = training_run()
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    two = training_run()
    assert_same_bits(one, two, "2 threads vs 1")


def test_one_and_two_threads_step_per_row_layouts_identically(restore_threads):
    """8-bit state blocked per row (short blocks at row ends), several tensors: the threads' shares are cut
    by elements, so they start inside rows and inside tensors; every block is still done once, whole."""
    def run() -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(5)
        params = [torch.randn(shape, generator=gen).requires_grad_() for shape in ((257, 301), (130, 700), (3, 5000))]
        opt = torchsgd8.SGD8bit(params, lr=0.01, momentum=0.9, nesterov=True)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return [t.detach().clone() for p in params for t in (p, opt.state[p]["state1"], opt.state[p]["absmax1"])]

    torch.set_num_threads(1)
    one = run()
    torch.set_num_threads(2)
    two = run()
    assert one[2].dim() == 2, "per-row state expected"
    assert_same_bits(one, two, "2 threads vs 1")


def test_one_and_two_threads_quantize_identically(restore_threads):
    values = special_values()
    torch.set_num_threads(1)
    one = ops.quantize_blockwise(values)
    torch.set_num_threads(2)
    two = ops.quantize_blockwise(values)
    assert torch.equal(one[0], two[0])
    assert torch.equal(bits_of(one[1]), bits_of(two[1]))  # same kernels: even NaN encodings agree


# ---- the other instruction sets' kernels -------------------------------------------------------------------


def special_values() -> torch.Tensor:
    """A float32 tensor of 1,000,077 elements (a partial last block, a length that is no multiple of 8):
    random blocks over 60 decades of scale, then blocks whose absmax is 1.0 or 3.0 holding every rounding
    threshold of the codebook and both float neighbours (both signs), then blocks of specials."""
    gen = torch.Generator().manual_seed(7)
    n = 1_000_077
    x = torch.randn(n, generator=gen)
    scale = 10.0 ** (torch.rand(n // BLOCK_SIZE + 1, generator=gen) * 60 - 30)
    x *= scale.repeat_interleave(BLOCK_SIZE)[:n]
    t = np.asarray(tables.positive_thresholds(signed_dynamic_map().numpy())[:-1], dtype=np.float32)
    ties = np.concatenate([t, np.nextafter(t, np.float32(np.inf)), np.nextafter(t, np.float32(0))])
    ties = torch.from_numpy(np.concatenate([ties, -ties]).astype(np.float32))  # 768 values
    pos = 100 * BLOCK_SIZE
    for absmax in (1.0, 3.0):
        vals = ties * absmax
        for start in range(0, len(vals), BLOCK_SIZE - 1):
            chunk = vals[start:start + BLOCK_SIZE - 1]
            x[pos:pos + len(chunk)] = chunk
            x[pos + len(chunk):pos + BLOCK_SIZE] = 0.0
            x[pos + BLOCK_SIZE - 1] = absmax  # the block's absmax, exactly
            pos += BLOCK_SIZE
    f32 = torch.finfo(torch.float32)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, f32.max, -f32.max,
                             f32.tiny, -f32.tiny, 1.0, -1.0, 2.0**-149, 3e-39, -3e-39])
    for i, s in enumerate(specials):  # one block per special, among ordinary values
        block = x[pos:pos + BLOCK_SIZE]
        block[i::16] = s
        pos += BLOCK_SIZE
    x[pos:pos + BLOCK_SIZE] = 0.0  # an all-zero block
    x[pos + BLOCK_SIZE:pos + 2 * BLOCK_SIZE] = -0.0
    x[pos + 2 * BLOCK_SIZE:pos + 3 * BLOCK_SIZE] = float("nan")
    x[pos + 3 * BLOCK_SIZE:pos + 4 * BLOCK_SIZE] = float("-inf")
    x[pos + 4 * BLOCK_SIZE:pos + 5 * BLOCK_SIZE] = 2.0**-149  # subnormal absmax
    x[-77:] = torch.linspace(-1, 1, 77)  # the partial last block
    return x


PORTABLE_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import torchsgd8
    from torchsgd8 import _C, ops
    import test_robustness as t

    values = torch.load(sys.argv[2])
    out = {"isa": _C.cpu_isa(), "quantized": {}, "run": t.training_run()}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        out["quantized"][str(dtype)] = ops.quantize_blockwise(values.to(dtype))
    codes, absmax = out["quantized"]["torch.float32"]
    out["dequantized"] = [ops.dequantize_blockwise(codes, absmax, d)
                          for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
    out["positions"] = t.position_check()
    torch.save(out, sys.argv[3])
''')


def position_check() -> list[int]:
    """Trials (of 50) in which equal inputs at different positions of one tensor (the SIMD body and the
    scalar tail) end up with different params after three steps."""
    gen = torch.Generator().manual_seed(3)
    bad = []
    for trial in range(50):
        v = torch.randn(3, generator=gen)
        for dtype in (torch.float32, torch.float64):
            p = torch.full((37,), v[0].item(), dtype=dtype).requires_grad_()
            opt = torchsgd8.SGD([p], lr=0.1 + trial * 1e-3, momentum=0.9, weight_decay=0.0123, nesterov=True)
            for s in range(3):
                p.grad = torch.full((37,), v[1 + s % 2].item() * (s + 1.37), dtype=dtype)
                opt.step()
            if not bool((p == p[0]).all()):
                bad.append(trial)
    return bad


@pytest.fixture(scope="module", params=["default", "avx2", "avx512"])
def portable(request, tmp_path_factory, run_with_kernel_set):
    """Results of another kernel set (a subprocess with TORCHSGD8_CPU_ISA set): every one this CPU runs
    other than the one in use here."""
    isa = request.param
    tmp = tmp_path_factory.mktemp(f"portable-{isa}")
    torch.save(special_values(), tmp / "values.pt")
    (tmp / "portable.py").write_text(PORTABLE_SCRIPT)
    run_with_kernel_set(isa, [sys.executable, str(tmp / "portable.py"), os.path.dirname(__file__),
                              str(tmp / "values.pt"), str(tmp / "out.pt")], timeout=300)
    out = torch.load(tmp / "out.pt")
    assert out["isa"] == isa.upper()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_portable_kernels_give_the_same_codes_and_absmax(portable, dtype):
    values = special_values()
    codes, absmax = ops.quantize_blockwise(values.to(dtype))
    p_codes, p_absmax = portable["quantized"][str(dtype)]
    mismatch = (codes != p_codes).nonzero().reshape(-1)
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} codes differ ({_C.cpu_isa()} vs {portable['isa']}), first at {mismatch[:5].tolist()}: "
        f"values {values.to(dtype)[mismatch[:5]].tolist()}, codes {codes[mismatch[:5]].tolist()} vs "
        f"{p_codes[mismatch[:5]].tolist()}")
    # NaN blocks: both NaN, but a vector maximum may yield 0xffffffff where DEFAULT gives 0x7fc00000; only
    # the NaN encoding may differ
    nan = absmax.isnan()
    assert torch.equal(nan, p_absmax.isnan()), "NaN blocks differ between the kernels"
    assert torch.equal(bits_of(absmax[~nan]), bits_of(p_absmax[~nan])), "absmax differs between the kernels"
    if dtype == torch.float32:
        # and both are the exact nearest code (ties to the smaller magnitude) where the block is finite
        finite = torch.isfinite(absmax) & (absmax > 0)
        idx = finite.repeat_interleave(BLOCK_SIZE)[:values.numel()].nonzero().reshape(-1)
        idx = torch.cat([idx[(idx >= 100 * BLOCK_SIZE) & (idx < 110 * BLOCK_SIZE)], idx[::29]])
        for chunk in idx.split(32_768):  # the brute-force reference holds 256 distances per value
            ratio = values[chunk] / absmax[chunk // BLOCK_SIZE]
            assert torch.equal(codes[chunk], nearest_code_reference(ratio))


def test_portable_kernels_dequantize_identically(portable):
    codes, absmax = portable["quantized"]["torch.float32"]
    for dtype, theirs in zip((torch.float32, torch.bfloat16, torch.float16, torch.float64), portable["dequantized"]):
        ours = ops.dequantize_blockwise(codes, absmax, dtype)
        assert torch.equal(bits_of(ours), bits_of(theirs)), dtype


def test_portable_kernels_are_position_independent(portable):
    """sgd_rule.h: every `x + a * y` is one fused multiply-add. Equal inputs must then give equal outputs
    wherever they sit in the tensor (SIMD body or scalar tail)."""
    assert position_check() == [], f"{_C.cpu_isa()} kernels"
    assert portable["positions"] == [], f"{portable['isa']} kernels: results depend on the element's position"


def test_portable_kernels_take_the_same_optimizer_steps(portable):
    ours = training_run()
    theirs = portable["run"]
    differing = [(i, x.dtype, tuple(x.shape)) for i, (x, y) in enumerate(zip(ours, theirs))
                 if not torch.equal(bits_of(x), bits_of(y))]
    assert not differing, f"{_C.cpu_isa()} and {portable['isa']} kernels differ in {differing}"


TUNING_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from torchsgd8 import _C, ops
    import test_robustness as t

    codes, absmax = ops.quantize_blockwise(t.special_values())
    torch.save({"isa": _C.cpu_isa(), "prefetch": _C.cpu_prefetch(), "gather": _C.cpu_gather(),
                "run": t.training_run() + [codes, absmax, ops.dequantize_blockwise(codes, absmax)]}, sys.argv[2])
''')


@pytest.mark.parametrize("setting, query, isa", [
    ("TORCHSGD8_CPU_PREFETCH", "prefetch", None),  # the 8-bit kernels of every ISA prefetch alike: this one's
    ("TORCHSGD8_CPU_GATHER", "gather", "avx2"),    # only the AVX2 kernels gather
])
def test_tuning_settings_change_no_result(tmp_path, run_with_kernel_set, setting, query, isa):
    """The kernels' tuning settings (read once per process, hence subprocesses) change speed, not results:
    steps, codes, absmax and dequantized values are bit-identical with each forced off and on, and equal
    this process's (whose kernels the cross-ISA tests above hold to the same bits)."""
    isa = isa or _C.cpu_isa().lower()
    script = tmp_path / "tuning.py"
    script.write_text(TUNING_SCRIPT)
    runs = {}
    for flag in ("0", "1"):
        out = tmp_path / f"out{flag}.pt"
        run_with_kernel_set(isa, [sys.executable, str(script), os.path.dirname(__file__), str(out)], timeout=300,
                            settings={setting: flag})
        runs[flag] = torch.load(out)
        assert runs[flag][query] is (flag == "1")
        assert runs[flag]["isa"] == isa.upper()
    assert_same_bits(runs["0"]["run"], runs["1"]["run"], f"{setting}=0 vs 1")
    codes, absmax = ops.quantize_blockwise(special_values())
    ours = training_run() + [codes, absmax, ops.dequantize_blockwise(codes, absmax)]
    # NaN blocks' absmax may differ in NaN encoding between kernel sets (see the portable tests)
    for i in (-2, -1):
        ours[i] = torch.nan_to_num(ours[i], nan=7.0)
        runs["1"]["run"][i] = torch.nan_to_num(runs["1"]["run"][i], nan=7.0)
    assert_same_bits(ours, runs["1"]["run"], f"this process vs {setting}=1")


@pytest.mark.parametrize("setting, value, message, failing", [
    ("TORCHSGD8_CPU_ISA", "avx1024", "TORCHSGD8_CPU_ISA must be 'default', 'avx2' or 'avx512', got 'avx1024'",
     ["cpu_isa", "step"]),
    ("TORCHSGD8_CPU_PREFETCH", "yes", "TORCHSGD8_CPU_PREFETCH must be '0' or '1', got 'yes'",
     ["cpu_isa", "cpu_prefetch", "step"]),
    ("TORCHSGD8_CPU_GATHER", "on", "TORCHSGD8_CPU_GATHER must be '0' or '1', got 'on'",
     ["cpu_isa", "cpu_gather", "step"]),
])
def test_invalid_cpu_settings_raise_runtime_errors(setting, value, message, failing):
    code = textwrap.dedent('''
        import torch, torchsgd8
        from torchsgd8 import _C
        p = torch.zeros(4096, requires_grad=True)
        p.grad = torch.ones(4096)
        step = torchsgd8.SGD8bit([p], lr=0.1, momentum=0.9).step
        for name, query in (("cpu_isa", _C.cpu_isa), ("cpu_prefetch", _C.cpu_prefetch), ("cpu_gather", _C.cpu_gather),
                            ("step", step)):
            try:
                query()
            except RuntimeError as e:
                print(name, str(e).splitlines()[0])
    ''')
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **{setting: value}),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]  # no abort from an exception crossing the C API
    raised = [line.split(" ", 1) for line in proc.stdout.splitlines()]
    assert [name for name, _ in raised] == failing, proc.stdout
    assert all(message in text for _, text in raised), proc.stdout


# ---- 64-bit sizes -------------------------------------------------------------------------------------------

BIG = 2**31 + 300  # 8,388,608 full blocks below 2**31, one full block above, then a 44-element tail


@pytest.mark.parametrize("numel, blocks", [
    (0, 0), (1, 1), (255, 1), (256, 1), (257, 2), (2**31 - 1, 2**23), (2**31, 2**23), (2**31 + 1, 2**23 + 1),
    (BIG, 2**23 + 2), (2**32 - 1, 2**24), (2**32, 2**24), (2**32 + 1, 2**24 + 1), (2**40 + 255, 2**32 + 1),
    (2**63 - 1, 2**55),
])
def test_num_blocks_near_and_beyond_2_31(numel, blocks):
    assert ops.num_blocks(numel) == blocks
    # the last block starts at (blocks - 1) * 256 and holds the rest
    if numel:
        assert 0 < numel - (blocks - 1) * BLOCK_SIZE <= BLOCK_SIZE


def test_fake_shapes_beyond_2_31():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        values = torch.empty(BIG, dtype=torch.bfloat16)
        codes, absmax = ops.quantize_blockwise(values)
        assert codes.shape == (BIG,) and codes.dtype == torch.uint8
        assert absmax.shape == (2**23 + 2,) and absmax.dtype == torch.float32
        back = ops.dequantize_blockwise(codes, absmax, torch.bfloat16)
        assert back.shape == (BIG,) and back.dtype == torch.bfloat16
        two_d = torch.empty(2**16, 2**15 + 3, dtype=torch.float16)  # 2**31 + 3 * 2**16 elements
        assert ops.quantize_blockwise(two_d)[1].shape == (2**23 + 768,)
    meta = torch.empty(BIG, dtype=torch.float32, device="meta")
    codes, absmax = ops.quantize_blockwise(meta)
    assert codes.shape == (BIG,) and absmax.shape == (2**23 + 2,) and absmax.device.type == "meta"


def test_symbolic_block_count():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    values = mode.from_tensor(torch.empty(300, dtype=torch.bfloat16),
                              symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC]))
    with mode:
        codes, absmax = ops.quantize_blockwise(values)
    size = absmax.shape[0]
    assert isinstance(size, torch.SymInt)
    (symbol,) = size.node.expr.free_symbols
    for numel in (1, 256, 257, 2**31 - 1, 2**31, BIG, 2**32 + 1):
        assert int(size.node.expr.subs({symbol: numel})) == ops.num_blocks(numel), numel


def test_op_checks_count_blocks_in_64_bits_without_touching_memory():
    """The C++ checks compute the expected block count of a 2**31+ element tensor. An expanded (stride 0)
    tensor of that size, or an untouched torch.empty one, costs no resident memory; the calls fail on the
    deliberately wrong absmax before any kernel runs."""
    before = rss_bytes()
    codes = torch.zeros(1, dtype=torch.uint8).expand(BIG)
    wrong = torch.zeros(1).expand(2**23 + 1)
    with pytest.raises(RuntimeError, match=f"absmax must hold one float32 per 256-element block of its {BIG} codes "
                                           rf"\(shape \[{BIG}\]\): shape \[{2**23 + 2}\] \(flat\)"):
        ops.dequantize_blockwise(codes, wrong, torch.bfloat16)
    huge = torch.zeros(1, dtype=torch.uint8).expand(2**32 + 1)
    with pytest.raises(RuntimeError, match=f"of its {2**32 + 1} codes .*: shape \\[{2**24 + 1}\\] \\(flat\\)"):
        ops.dequantize_blockwise(huge, wrong, torch.float32)

    param = torch.empty(BIG, dtype=torch.bfloat16)  # virtual memory only: never written or read here
    state = torch.empty(BIG, dtype=torch.uint8)
    lr, momentum = torch.tensor(0.1), torch.tensor(0.9)
    for absmax in (torch.zeros(2**23 + 1), torch.zeros(2**23 + 3)):
        message = f"absmax\\[0\\] must hold one float32 per 256-element block of its {BIG} codes .*: shape \\[{2**23 + 2}\\]"
        with pytest.raises(RuntimeError, match=message):
            ops.sgd8bit_update_([param], [param], [state], [absmax], lr, momentum, 0.0, 0.0, False, False, False)
    assert rss_bytes() - before < 256 * 2**20, "the checks touched the big tensors"


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def all_equal(t: torch.Tensor, value) -> bool:
    """(t == value).all() in 256 MiB pieces (a whole comparison would need another 2 GiB)."""
    return all(bool((piece == value).all()) for piece in t.split(2**28))


@pytest.mark.slow
def test_quantize_and_dequantize_beyond_2_31_elements():
    """A bf16 tensor of 2**31 + 300 elements (4 GiB, plus 2 GiB of codes): the blocks around 2**31 and the
    44-element tail block are quantized and dequantized like a small tensor's."""
    if _mem_available() < 10 * 2**30:
        pytest.skip("needs 10 GiB of free memory")
    gen = torch.Generator().manual_seed(11)
    windows = [(0, 512), (2**31 - 512, 2**31), (2**31, BIG)]  # the start, the blocks either side of 2**31
    x = torch.zeros(BIG, dtype=torch.bfloat16)
    parts = {}
    for start, stop in windows:
        scale = 10.0 ** torch.randint(-3, 4, (), generator=gen)
        v = (torch.randn(stop - start, generator=gen) * scale).to(torch.bfloat16)
        x[start:stop] = v
        parts[start] = v
    codes, absmax = ops.quantize_blockwise(x)
    del x
    assert codes.shape == (BIG,) and absmax.shape == (2**23 + 2,)
    for start, stop in windows:
        v = parts[start].float()
        blocks = torch.arange(start // BLOCK_SIZE, ops.num_blocks(stop))
        expect_absmax = torch.stack([v[b * BLOCK_SIZE - start:(b + 1) * BLOCK_SIZE - start].abs().max()
                                     for b in blocks])
        assert torch.equal(absmax[blocks], expect_absmax), (start, stop)
        ratio = v / absmax[(torch.arange(start, stop) // BLOCK_SIZE)]
        assert torch.equal(codes[start:stop], nearest_code_reference(ratio)), (start, stop)
    zero_blocks = torch.ones(absmax.numel(), dtype=torch.bool)
    for start, stop in windows:
        zero_blocks[start // BLOCK_SIZE:ops.num_blocks(stop)] = False
    assert bool((absmax[zero_blocks] == 0).all())
    assert all_equal(codes[512:2**31 - 512], 127)

    back = ops.dequantize_blockwise(codes, absmax, torch.bfloat16)
    qmap = signed_dynamic_map()
    for start, stop in windows:
        expect = (qmap[codes[start:stop].long()] * absmax[torch.arange(start, stop) // BLOCK_SIZE]).to(torch.bfloat16)
        assert torch.equal(back[start:stop], expect), (start, stop)
    assert all_equal(back[512:2**31 - 512], 0)


@pytest.mark.slow
def test_8bit_step_on_a_param_beyond_2_31_elements():
    """SGD8bit on one bf16 param of 2**31 + 300 elements (param, grad: 4 GiB each; codes: 2 GiB): the
    elements beyond 2**31 move like the first ones (same grads there, same update)."""
    if _mem_available() < 14 * 2**30:
        pytest.skip("needs 14 GiB of free memory")
    p = torch.ones(BIG, dtype=torch.bfloat16, requires_grad=True)
    opt = torchsgd8.SGD8bit([p], lr=0.5, momentum=0.9)
    pattern = torch.linspace(-1, 1, 300).to(torch.bfloat16)
    p.grad = torch.zeros(BIG, dtype=torch.bfloat16)
    for start in (0, 2**31 - 300, 2**31, BIG - 300):
        p.grad[start:start + 300] = pattern
    for _ in range(2):
        opt.step()
    state = opt.state[p]
    assert state["state1"].shape == (BIG,) and state["absmax1"].shape == (2**23 + 2,)
    head = p.detach()[:300].clone()
    # blocks laid out the same way relative to their 256-aligned start: 0 and 2**31 (both aligned)
    assert torch.equal(p.detach()[2**31:2**31 + 300], head)
    assert torch.equal(state["state1"][2**31:2**31 + 300], state["state1"][:300])
    assert torch.equal(state["absmax1"][2**23:2**23 + 2], state["absmax1"][:2])
    # the tail block (44 elements) and an unaligned window were updated too
    assert not bool((p.detach()[BIG - 44:] == 1).all())
    assert not bool((p.detach()[2**31 - 300:2**31] == 1).all())
    # untouched elements (zero grad) stay 1 and their blocks hold zeros
    assert all_equal(p.detach()[1024:2**31 - 1024], 1)
    assert bool((state["absmax1"][4:2**23 - 4] == 0).all())


# ---- memory -------------------------------------------------------------------------------------------------

SLACK = 2 * 2**20  # a leak of one 0-dim tensor per step would be several MiB over these runs


def _small_optimizer(with_complex: bool):
    """Four kinds of group: 8-bit + fp32 buffers, bf16 with stochastic rounding, no momentum (float64), and
    (eager only: a compiled step with complex params fails, see tests/test_bad_inputs.py) complex params
    with a tensor lr."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(300, generator=gen).requires_grad_(), torch.randn(7, generator=gen).requires_grad_(),
              torch.randn(260, generator=gen).to(torch.bfloat16).requires_grad_(),
              torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_()]
    groups = [{"params": params[:2], "optim_bits": 8},
              {"params": params[2:3], "optim_bits": 8, "stochastic_rounding": True},
              {"params": params[3:4], "momentum": 0.0}]
    if with_complex:
        params.append(torch.randn(4, 5, generator=gen, dtype=torch.complex64).requires_grad_())
        groups.append({"params": params[4:], "lr": torch.tensor(1e-4)})
    opt = torchsgd8.SGD(groups, lr=1e-4, momentum=0.9, min_8bit_size=256)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) if p.is_complex() else \
            torch.randn(p.shape, generator=gen).to(p.dtype)
    return opt, params


def _growth(step, warmup: int, steps: int) -> int:
    for _ in range(warmup):
        step()
    before = rss_bytes()
    for _ in range(steps):
        step()
    return rss_bytes() - before


def test_rss_is_flat_over_10000_eager_steps():
    opt, params = _small_optimizer(with_complex=True)
    growth = _growth(opt.step, warmup=500, steps=10_000)
    assert growth < SLACK, f"RSS grew by {growth / 2**20:.2f} MiB over 10,000 steps"
    assert opt.state[params[0]]["step"].item() == 10_500


def test_rss_is_flat_over_2000_compiled_steps():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    try:
        opt, params = _small_optimizer(with_complex=False)
        counter = CompileCounterWithBackend("aot_eager")
        step = torch.compile(opt.step, backend=counter, fullgraph=True)
        growth = _growth(step, warmup=50, steps=2_000)
        assert counter.frame_count <= 2, counter.frame_count  # the steps really ran compiled
        assert growth < SLACK, f"RSS grew by {growth / 2**20:.2f} MiB over 2,000 compiled steps"
        assert opt.state[params[0]]["step"].item() == 2_050
    finally:
        torch._dynamo.reset()
