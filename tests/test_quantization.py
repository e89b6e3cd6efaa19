"""The 8-bit codebook and the blockwise quantizer (torchsgd8.ops.quantize_blockwise / dequantize_blockwise).

Specification under test:
  * the codebook is bitsandbytes' create_dynamic_map(signed=True), bit for bit, and it is the kernel's table;
  * a tensor is cut into blocks of 256 consecutive elements of its flattened form, absmax = max |v| per block
    (float32; NaN anywhere in the block makes it NaN), and every element gets the code of the map entry
    nearest to value / absmax computed as one IEEE float32 division, ties to the entry of smaller magnitude;
  * an all-zero block has absmax 0 and codes 127 (the code of 0.0);
  * results do not depend on the number of threads.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from torchsgd8 import ops
from torchsgd8.quantization import BLOCK_SIZE, ZERO_CODE, absmax_per_element, signed_dynamic_map

from quant_reference import nearest_code, nearest_code_reference, nearest_code_segments, tables

QMAP = signed_dynamic_map()
QMAP64 = QMAP.to(torch.float64)
F32_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32
F32_TRUE_MIN = 2.0**-149  # smallest subnormal float32


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float32 tensor, so comparisons are bitwise (-0.0 != 0.0, NaN == NaN of same bits)."""
    return t.contiguous().view(torch.int32)


def next_f32(x: torch.Tensor, direction: float) -> torch.Tensor:
    return torch.nextafter(x, torch.full_like(x, direction))


def reference_quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent blockwise quantizer: absmax with torch reductions, value / absmax as a float32 division,
    then the brute-force nearest_code_reference (in chunks, to bound its O(256 * n) memory)."""
    flat = values.detach().reshape(-1).to(torch.float32)
    n = flat.numel()
    nblocks = (n + BLOCK_SIZE - 1) // BLOCK_SIZE
    padded = torch.zeros(nblocks * BLOCK_SIZE, dtype=torch.float32)
    padded[:n] = flat
    blocks = padded.reshape(nblocks, BLOCK_SIZE)
    mags = blocks.abs()
    absmax = mags.amax(dim=1)
    # amax ignores NaN on some paths; the specification says a NaN makes the block's absmax NaN
    absmax = torch.where(torch.isnan(blocks).any(dim=1), torch.full_like(absmax, float("nan")), absmax)
    ratio = (blocks / absmax[:, None]).reshape(-1)[:n]
    codes = torch.empty(n, dtype=torch.uint8)
    for start in range(0, n, 65536):
        codes[start:start + 65536] = nearest_code_reference(ratio[start:start + 65536], QMAP)
    zero_block = (absmax == 0).repeat_interleave(BLOCK_SIZE)[:n]
    codes[zero_block] = ZERO_CODE
    return codes.reshape(values.shape), absmax


def midpoints64() -> torch.Tensor:
    """Exact midpoints (float64) between neighbouring codes."""
    return (QMAP64[:-1] + QMAP64[1:]) / 2


# --------------------------------------------------------------------------------------------------------
# the codebook


def test_map_is_bitsandbytes_create_dynamic_map_bit_for_bit():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import create_dynamic_map

    theirs = create_dynamic_map(signed=True).to(torch.float32)
    assert theirs.shape == (256,)
    assert torch.equal(bits(theirs), bits(QMAP))


def test_map_shape_and_landmarks():
    assert QMAP.dtype == torch.float32 and QMAP.shape == (256,)
    assert bool((QMAP[1:] > QMAP[:-1]).all()), "the map must be strictly increasing"
    assert QMAP[ZERO_CODE].item() == 0.0
    assert QMAP[255].item() == 1.0
    # 127 negative entries, the lowest is about -0.993 (there is no -1.0); 128 positive ones
    assert int((QMAP < 0).sum()) == 127 and int((QMAP > 0).sum()) == 128
    assert -0.994 < QMAP[0].item() < -0.992
    # symmetric apart from +1.0
    assert torch.equal(bits(-QMAP[:127].flip(0)), bits(QMAP[128:255]))


def test_kernel_table_is_the_map():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    decoded = ops.dequantize_blockwise(codes, torch.tensor([1.0]), torch.float32)
    assert torch.equal(bits(decoded), bits(QMAP))
    # a power-of-two absmax scales exactly
    decoded = ops.dequantize_blockwise(codes, torch.tensor([0.25]), torch.float32)
    assert torch.equal(bits(decoded), bits(QMAP * 0.25))


def test_every_map_entry_quantizes_to_its_own_code():
    # block = the 256 map entries (absmax exactly 1.0 thanks to the +1.0 entry)
    codes, absmax = ops.quantize_blockwise(QMAP.clone())
    assert absmax.tolist() == [1.0]
    assert torch.equal(codes, torch.arange(256, dtype=torch.int32).to(torch.uint8))


def test_dequantize_reads_bitsandbytes_codes_like_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")
    F = bnb.functional
    x = torch.randn(3 * 256 + 77, generator=torch.Generator().manual_seed(3)) * 5
    their_codes, qs = F.quantize_blockwise(x, blocksize=256)
    theirs = F.dequantize_blockwise(their_codes, qs, blocksize=256)
    ours = ops.dequantize_blockwise(their_codes, qs.absmax.to(torch.float32), torch.float32)
    assert torch.equal(bits(ours), bits(theirs.to(torch.float32)))


# --------------------------------------------------------------------------------------------------------
# exact nearest code


def _blocks_with_absmax(ratios: torch.Tensor, absmax: float) -> torch.Tensor:
    """Values = ratios * absmax, cut into blocks whose first element is +absmax (so every block's absmax is
    exactly ``absmax`` as long as |ratios| <= 1 and the products do not round above it)."""
    per_block = BLOCK_SIZE - 1
    n = ratios.numel()
    nblocks = (n + per_block - 1) // per_block
    body = torch.zeros(nblocks * per_block, dtype=torch.float32)
    body[:n] = ratios.to(torch.float32) * absmax
    body = body.reshape(nblocks, per_block)
    head = torch.full((nblocks, 1), absmax, dtype=torch.float32)
    return torch.cat([head, body], dim=1).reshape(-1)


def _nearest_code_test_values(gen: torch.Generator) -> torch.Tensor:
    mids = midpoints64()
    mids32 = mids.to(torch.float32)
    representable = mids32.to(torch.float64) == mids  # ties that float32 can express exactly
    tie_ratios = mids32[representable]
    assert tie_ratios.numel() > 100, "most midpoints must be representable, or the tie test is vacuous"

    # ratios crowding every rounding threshold: the float32 midpoint and +-1..24 ulps around it
    around = [mids32]
    lo, hi = mids32.clone(), mids32.clone()
    for _ in range(24):
        lo, hi = next_f32(lo, -math.inf), next_f32(hi, math.inf)
        around += [lo, hi]
    around = torch.cat(around).clamp(-1, 1)

    specials = torch.tensor(
        [0.0, -0.0, F32_TRUE_MIN, -F32_TRUE_MIN, 1e-40, -1e-40, F32_TINY, -F32_TINY, 1e-30, -1e-30,
         1.0, -1.0, 0.5, -0.5, QMAP[0].item(), QMAP[1].item(), (QMAP[0].item() - 1) / 2],
        dtype=torch.float32,
    )
    parts = []
    # exact powers of two as absmax keep value / absmax == ratio exactly, so ties stay ties
    for absmax in (1.0, 2.0**-20, 2.0**40, 2.0**-126):
        for ratios in (tie_ratios, around, QMAP, specials):
            parts.append(_blocks_with_absmax(ratios, absmax))
    # arbitrary absmax (divisions round), including a subnormal and a huge one
    for absmax in (3.7e5, 1.2345e-3, 7.0e-41, 1.0e30, 0.1):
        for ratios in (around, specials):
            parts.append(_blocks_with_absmax(ratios, absmax))
        # values exactly at (absmax * midpoint) rounded: the division lands on or next to the tie
        parts.append(_blocks_with_absmax(tie_ratios, absmax))

    # dense uniform ratios with absmax 1 (every code, many values per threshold gap)
    parts.append(_blocks_with_absmax(torch.rand(200_000, generator=gen) * 2 - 1, 1.0))
    # exact block maxima that are negative: the block's absmax is |min|, ratio exactly -1
    neg = torch.randn(40, BLOCK_SIZE, generator=gen)
    neg[:, 7] = -neg.abs().amax(dim=1) * 2
    parts.append(neg.reshape(-1))
    # random normals of many scales, one scale per block, from subnormal to 1e30
    nblocks = 3200
    scales = 10.0 ** (torch.rand(nblocks, 1, generator=gen, dtype=torch.float64) * 70 - 40)
    normals = (torch.randn(nblocks, BLOCK_SIZE, generator=gen, dtype=torch.float64) * scales).to(torch.float32)
    parts.append(normals.reshape(-1))
    # heavy tails: a few huge values per block make most ratios tiny (codes near zero)
    heavy = torch.randn(300, BLOCK_SIZE, generator=gen)
    heavy[:, ::37] *= 1e6
    parts.append(heavy.reshape(-1))
    values = torch.cat(parts)
    pad = (-values.numel()) % BLOCK_SIZE
    return torch.cat([values, torch.zeros(pad)])


def test_codes_are_exact_nearest_over_a_million_values(gen):
    values = _nearest_code_test_values(gen)
    assert values.numel() >= 1_000_000
    codes, absmax = ops.quantize_blockwise(values)
    ref_codes, ref_absmax = reference_quantize(values)
    assert torch.equal(bits(absmax), bits(ref_absmax))
    mismatch = (codes != ref_codes).nonzero().reshape(-1)
    if mismatch.numel():
        i = mismatch[0].item()
        a = absmax[i // BLOCK_SIZE].item()
        pytest.fail(
            f"{mismatch.numel()} codes differ from the exact nearest code; first at {i}: value {values[i].item()!r}, "
            f"absmax {a!r}, ratio {(values[i] / absmax[i // BLOCK_SIZE]).item()!r}, "
            f"kernel code {codes[i].item()}, nearest {ref_codes[i].item()}"
        )


def test_codes_are_exact_for_quotients_near_thresholds_at_every_scale(gen):
    """value / absmax lands within a few ulps of a threshold for absmax of every binade from 2^-80 to 2^80,
    random mantissas, and the edges 2^-64 and 2^64 (the AVX2 kernels compute the quotient by multiplying
    with 1/absmax and an fma correction inside [2^-64, 2^64) and divide outside it)."""
    thresholds = torch.from_numpy(tables.positive_thresholds(QMAP.numpy())[:-1].view("int32").astype("int64"))
    near = (thresholds[:, None] + torch.arange(-6, 7)).reshape(-1).to(torch.int32).view(torch.float32)
    near = near[near <= 1]
    ratios = torch.cat([near, -near, torch.rand(2000, generator=gen) * 2 - 1])
    exponents = torch.arange(-80, 81, 4, dtype=torch.float64)
    mantissas = 1 + torch.rand(exponents.numel(), generator=gen, dtype=torch.float64)
    scales = torch.cat([mantissas * 2.0**exponents, torch.tensor([2.0**-64, 2.0**64])])
    edges = torch.tensor([2.0**-64, 2.0**64], dtype=torch.float32)
    scales = torch.cat([scales.to(torch.float32), next_f32(edges, -math.inf), next_f32(edges, math.inf)])
    values = torch.cat([_blocks_with_absmax(ratios, a.item()) for a in scales])
    codes, absmax = ops.quantize_blockwise(values)
    ref_codes, ref_absmax = reference_quantize(values)
    assert torch.equal(bits(absmax), bits(ref_absmax))
    mismatch = (codes != ref_codes).nonzero().reshape(-1)
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} codes differ; first value {values[mismatch[0]].item()!r} with absmax "
        f"{absmax[mismatch[0] // BLOCK_SIZE].item()!r}: kernel {codes[mismatch[0]].item()}, "
        f"nearest {ref_codes[mismatch[0]].item()}")


def test_ties_go_to_the_smaller_magnitude():
    mids = midpoints64()
    mids32 = mids.to(torch.float32)
    representable = (mids32.to(torch.float64) == mids).nonzero().reshape(-1)
    ratios = mids32[representable]
    values = _blocks_with_absmax(ratios, 1.0)
    codes, absmax = ops.quantize_blockwise(values)
    assert absmax.eq(1.0).all()
    got = torch.cat([c[1:] for c in codes.reshape(-1, BLOCK_SIZE)])[: ratios.numel()].long()
    # midpoint i lies between codes i and i+1: the positive side keeps i (smaller), the negative side i+1
    expected = torch.where(ratios > 0, representable, representable + 1)
    assert torch.equal(got, expected)
    # and one ulp beyond the tie moves away from zero
    beyond = next_f32(ratios, math.inf) * (ratios > 0) + next_f32(ratios, -math.inf) * (ratios < 0)
    codes, _ = ops.quantize_blockwise(_blocks_with_absmax(beyond, 1.0))
    got = torch.cat([c[1:] for c in codes.reshape(-1, BLOCK_SIZE)])[: ratios.numel()].long()
    assert torch.equal(got, torch.where(ratios > 0, representable + 1, representable))


def test_signed_zero_and_tiny_values_get_code_of_zero():
    values = torch.tensor([1.0, 0.0, -0.0, F32_TRUE_MIN, -F32_TRUE_MIN, 1e-40, -1e-40, F32_TINY, -F32_TINY])
    codes, absmax = ops.quantize_blockwise(values)
    assert absmax.tolist() == [1.0]
    assert codes[1:].tolist() == [ZERO_CODE] * 8
    assert codes[0].item() == 255
    # a block of subnormals alone: absmax is the subnormal, its element quantizes to +-1
    sub = torch.tensor([1e-40, -1e-40, 5e-41, 0.0])
    codes, absmax = ops.quantize_blockwise(sub)
    assert bits(absmax).tolist() == bits(torch.tensor([1e-40])).tolist()
    assert codes[:2].tolist() == [255, 0] and codes[3].item() == ZERO_CODE
    assert torch.equal(codes, reference_quantize(sub)[0])


# --------------------------------------------------------------------------------------------------------
# the places where a fast nearest-code rule can go wrong: around every threshold and every binade edge
# (the AVX-512 kernels' decade segments, the AVX2 kernels' buckets), and every float in [0, 1] (slow)


def _kernel_codes_of_ratios(ratios: torch.Tensor) -> torch.Tensor:
    """Kernel codes of float32 ``ratios`` (|r| <= 1) quantized with absmax exactly 1, so v / absmax == r."""
    codes, absmax = ops.quantize_blockwise(_blocks_with_absmax(ratios, 1.0))
    assert absmax.eq(1.0).all()
    return codes.reshape(-1, BLOCK_SIZE)[:, 1:].reshape(-1)[:ratios.numel()]


def _ratios_from_bits(bits: torch.Tensor) -> torch.Tensor:
    bits = bits[(bits >= 0) & (bits <= 0x3F800000)].to(torch.int32)  # floats in [0, 1]
    magnitudes = bits.view(torch.float32)
    return torch.cat([magnitudes, -magnitudes])


def _near_every_edge() -> torch.Tensor:
    """Both signs of every float within 2**12 ulps of a threshold, and within 64 ulps of a binade edge."""
    thresholds = torch.from_numpy(tables.positive_thresholds(QMAP.numpy())[:-1].view("int32").astype("int64"))
    around = torch.arange(-2**12, 2**12 + 1)
    edges = torch.arange(0, 128) << 23
    bits = torch.cat([(thresholds[:, None] + around).reshape(-1), (edges[:, None] + torch.arange(-64, 65)).reshape(-1)])
    return _ratios_from_bits(bits.unique())


def test_codes_are_exact_around_every_threshold_and_binade_edge():
    ratios = _near_every_edge()
    assert ratios.numel() > 2_000_000
    codes = _kernel_codes_of_ratios(ratios)
    expected = nearest_code(ratios)
    sample = torch.arange(0, ratios.numel(), 97)
    assert torch.equal(expected[sample], nearest_code_reference(ratios[sample]))  # the bucket rule is exact
    mismatch = (codes != expected).nonzero().reshape(-1)
    assert mismatch.numel() == 0, (
        f"{mismatch.numel()} codes differ, first ratios {ratios[mismatch[:5]].tolist()}: kernel "
        f"{codes[mismatch[:5]].tolist()} vs nearest {expected[mismatch[:5]].tolist()}")


def test_segment_rule_is_exact_away_from_integers():
    """The AVX-512 kernels' arithmetic rule (quant_reference.nearest_code_segments), checked in Python
    on any CPU: wherever it does not defer to the lookup it gives the exact code, and it defers rarely."""
    ratios = _near_every_edge()
    codes, near = nearest_code_segments(ratios)
    expected = nearest_code(ratios)
    assert torch.equal(codes[~near], expected[~near])
    assert near.any()  # some of these values are within kSegmentNear of an integer position ...
    # ... and the segment boundaries themselves are found by exact compares
    boundaries = torch.from_numpy(tables.segment_boundaries(tables.positive_thresholds(QMAP.numpy())).astype("int64"))
    at_boundaries = _ratios_from_bits(torch.cat([boundaries - 1, boundaries, boundaries + 1]))
    assert torch.equal(nearest_code_segments(at_boundaries)[0], nearest_code(at_boundaries))
    uniform = torch.rand(1_000_000, generator=torch.Generator().manual_seed(5)) * 2 - 1
    codes, near = nearest_code_segments(uniform)
    assert torch.equal(codes[~near], nearest_code(uniform)[~near])
    assert near.float().mean().item() < 1e-3  # the fallback is rare on ordinary values


def _check_every_float_in_the_unit_interval():
    chunk = 2**24
    for start in range(0, 0x3F800000 + 1, chunk):
        ratios = _ratios_from_bits(torch.arange(start, min(start + chunk, 0x3F800000 + 1), dtype=torch.int64))
        codes = _kernel_codes_of_ratios(ratios)
        mismatch = (codes != nearest_code(ratios)).nonzero().reshape(-1)
        assert mismatch.numel() == 0, f"bits {start:#x}+: ratios {ratios[mismatch[:5]].tolist()}"


KERNEL_VARIANTS = {  # name: (TORCHSGD8_CPU_ISA, other settings)
    "default": ("default", None),
    "avx2 gathers": ("avx2", {"TORCHSGD8_CPU_GATHER": "1"}),
    "avx2 scalar loads": ("avx2", {"TORCHSGD8_CPU_GATHER": "0"}),
    "avx512": ("avx512", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["in use", *KERNEL_VARIANTS])
def test_codes_are_exact_for_every_float_in_the_unit_interval(variant, run_with_kernel_set):
    """Both signs of all 2**30 floats in [0, 1], for the kernels in use and (in a subprocess: the choice is
    made once per process) every other set this CPU runs, the AVX2 one with both kinds of table reads."""
    if variant == "in use":
        _check_every_float_in_the_unit_interval()
        return
    isa, settings = KERNEL_VARIANTS[variant]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_quantization as t; "
            "from torchsgd8 import _C; print(_C.cpu_isa()); t._check_every_float_in_the_unit_interval()")
    proc = run_with_kernel_set(isa, [sys.executable, "-c", code, os.path.dirname(__file__)], timeout=1200,
                               settings=settings)
    assert proc.stdout.split()[0] == isa.upper()


# --------------------------------------------------------------------------------------------------------
# zero blocks, partial blocks, dtypes, NaN


def test_all_zero_block_round_trips_to_zeros():
    values = torch.randn(4 * BLOCK_SIZE, generator=torch.Generator().manual_seed(1))
    values[BLOCK_SIZE:2 * BLOCK_SIZE] = 0.0
    values[2 * BLOCK_SIZE:3 * BLOCK_SIZE] = -0.0
    codes, absmax = ops.quantize_blockwise(values)
    assert absmax[1].item() == 0.0 and absmax[2].item() == 0.0
    assert (codes[BLOCK_SIZE:3 * BLOCK_SIZE] == ZERO_CODE).all()
    back = ops.dequantize_blockwise(codes, absmax, torch.float32)
    assert not torch.isnan(back).any()
    assert (back[BLOCK_SIZE:3 * BLOCK_SIZE] == 0).all()
    assert absmax[0].item() > 0 and absmax[3].item() > 0
    # a tensor that is entirely zero, with a partial last block
    codes, absmax = ops.quantize_blockwise(torch.zeros(1000))
    assert absmax.shape == (4,) and (absmax == 0).all() and (codes == ZERO_CODE).all()
    assert (ops.dequantize_blockwise(codes, absmax, torch.float32) == 0).all()


@pytest.mark.parametrize("shape", [(1,), (255,), (256,), (257,), (1000,), (3, 5, 17), (64, 257), (0,)])
def test_partial_last_block(shape, gen):
    values = torch.randn(shape, generator=gen) * 3
    if values.numel():
        values.view(-1)[-1] = 40.0  # the partial last block's maximum is its own, not the previous block's
    codes, absmax = ops.quantize_blockwise(values)
    n = values.numel()
    assert codes.shape == values.shape and codes.dtype == torch.uint8
    assert absmax.shape == ((n + BLOCK_SIZE - 1) // BLOCK_SIZE,) and absmax.dtype == torch.float32
    ref_codes, ref_absmax = reference_quantize(values)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(bits(absmax), bits(ref_absmax))
    if n:
        assert absmax[-1].item() == 40.0
        last = values.reshape(-1)[(n - 1) // BLOCK_SIZE * BLOCK_SIZE:]
        assert absmax[-1].item() == last.abs().max().item()
    back = ops.dequantize_blockwise(codes, absmax, torch.float32)
    assert back.shape == values.shape


@pytest.mark.parametrize("shape", [(1, 1), (3, 255), (4, 257), (2, 3, 100), (5, 512), (0, 300), (2, 0)], ids=str)
def test_per_row_blocks_restart_at_each_row(shape, gen, restore_threads):
    """per_row: every index of dim 0 is quantized as its own flat tensor (its last block partial)."""
    values = torch.randn(shape, generator=gen) * 10.0 ** (torch.arange(shape[0]) % 5 - 2.0).reshape(-1, *[1] * (len(shape) - 1))
    codes, absmax = ops.quantize_blockwise(values, per_row=True)
    row = math.prod(shape[1:])
    assert codes.shape == values.shape and absmax.shape == (shape[0], (row + BLOCK_SIZE - 1) // BLOCK_SIZE)
    for r in range(shape[0]):
        ref_codes, ref_absmax = reference_quantize(values[r].reshape(-1))
        assert torch.equal(codes[r].reshape(-1), ref_codes), f"row {r}"
        assert torch.equal(bits(absmax[r]), bits(ref_absmax)), f"row {r}"
    back = ops.dequantize_blockwise(codes, absmax, torch.float32)
    want = QMAP[codes.long()] * absmax_per_element(absmax, shape)
    assert torch.equal(bits(back), bits(want))
    # a threaded split of many rows gives the same codes as one thread (blocks are never shared)
    many = torch.randn(3000, 300, generator=gen)
    torch.set_num_threads(1)
    one = ops.quantize_blockwise(many, per_row=True)
    torch.set_num_threads(2)
    two = ops.quantize_blockwise(many, per_row=True)
    assert torch.equal(one[0], two[0]) and torch.equal(bits(one[1]), bits(two[1]))


def test_per_row_needs_two_dims():
    for shape in ((), (300,)):
        with pytest.raises(RuntimeError, match="per_row needs 2 or more dims"):
            ops.quantize_blockwise(torch.ones(shape), per_row=True)


def test_non_contiguous_input_is_quantized_in_logical_order(gen):
    base = torch.randn(300, 40, generator=gen)
    values = base.t()  # (40, 300), not contiguous
    codes, absmax = ops.quantize_blockwise(values)
    ref_codes, ref_absmax = reference_quantize(values.contiguous())
    assert codes.shape == values.shape
    assert torch.equal(codes, ref_codes) and torch.equal(bits(absmax), bits(ref_absmax))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_input_dtypes_quantize_their_float32_value(dtype, gen):
    values = (torch.randn(5 * BLOCK_SIZE + 31, generator=gen, dtype=torch.float64) * 7).to(dtype)
    values[:3] = torch.tensor([0.0, -0.0, 1.0], dtype=dtype)
    codes, absmax = ops.quantize_blockwise(values)
    assert absmax.dtype == torch.float32
    # the kernel converts each element to float32 (round to nearest) and quantizes that
    ref_codes, ref_absmax = reference_quantize(values.to(torch.float32))
    assert torch.equal(codes, ref_codes)
    assert torch.equal(bits(absmax), bits(ref_absmax))
    # dequantize to the same dtype: the float32 product qmap[code] * absmax, converted once
    back = ops.dequantize_blockwise(codes, absmax, dtype)
    assert back.dtype == dtype
    blocks = torch.arange(values.numel()) // BLOCK_SIZE
    expected = (QMAP[codes.long()] * absmax[blocks]).to(dtype)
    assert torch.equal(back, expected)


def test_float64_input_rounds_to_float32_before_quantizing():
    # 1 + 2**-30 is not a float32: as float32 it is 1.0, so absmax is exactly 1.0
    values = torch.tensor([1.0 + 2.0**-30, 0.5], dtype=torch.float64)
    codes, absmax = ops.quantize_blockwise(values)
    assert absmax.tolist() == [1.0]
    assert codes[0].item() == 255


def test_nan_makes_its_block_absmax_nan_and_spares_other_blocks(gen):
    values = torch.randn(3 * BLOCK_SIZE + 10, generator=gen)
    for position in (BLOCK_SIZE + 0, BLOCK_SIZE + 200, 3 * BLOCK_SIZE + 9):
        v = values.clone()
        v[position] = float("nan")
        codes, absmax = ops.quantize_blockwise(v)
        block = position // BLOCK_SIZE
        assert torch.isnan(absmax[block])
        others = [b for b in range(absmax.numel()) if b != block]
        assert not torch.isnan(absmax[others]).any()
        back = ops.dequantize_blockwise(codes, absmax, torch.float32)
        in_block = slice(block * BLOCK_SIZE, min((block + 1) * BLOCK_SIZE, v.numel()))
        assert torch.isnan(back[in_block]).all(), "the NaN must stay visible across its whole block"
        outside = torch.ones(v.numel(), dtype=torch.bool)
        outside[in_block] = False
        assert not torch.isnan(back[outside]).any()
        ref_codes, _ = reference_quantize(v)
        assert torch.equal(codes[outside], ref_codes[outside])


# --------------------------------------------------------------------------------------------------------
# round-trip error


def error_bound_in_ratio_space(ratio: torch.Tensor) -> torch.Tensor:
    """Largest distance from ratio (in [-1, 1]) to its nearest code, from the codebook alone.

    Between two neighbouring codes q[i] <= r <= q[i+1] the nearest code is at most half their gap away.
    Below the lowest code q[0] (about -0.993: the map has +1.0 but no -1.0) there is no code on the left,
    so r in [-1, q[0]) is rounded up to q[0] and its error is q[0] - r, up to 1 + q[0] (about 0.0070) --
    larger than half the gap of the two lowest codes, so that end needs its own bound.
    """
    r = ratio.to(torch.float64)
    upper = torch.searchsorted(QMAP64, r).clamp(1, 255)  # first code >= r
    half_gap = (QMAP64[upper] - QMAP64[upper - 1]) / 2
    return torch.where(r < QMAP64[0], QMAP64[0] - r, half_gap)


def test_round_trip_error_is_within_half_the_local_code_gap(gen):
    scales = 10.0 ** (torch.rand(600, 1, generator=gen, dtype=torch.float64) * 40 - 20)
    values = (torch.randn(600, BLOCK_SIZE, generator=gen, dtype=torch.float64) * scales).to(torch.float32)
    values[::7, 3] = -values[::7].abs().amax(dim=1) * 1.5  # blocks whose maximum is negative: ratio -1
    values = values.reshape(-1)
    codes, absmax = ops.quantize_blockwise(values)
    back = ops.dequantize_blockwise(codes, absmax, torch.float32)
    a = absmax.repeat_interleave(BLOCK_SIZE).to(torch.float64)
    ratio = (values / absmax.repeat_interleave(BLOCK_SIZE)).to(torch.float64)  # what the kernel rounded
    err = (back.to(torch.float64) - values.to(torch.float64)).abs()
    # slack for float32 rounding: the division (|ratio error| <= 2**-24) and the product qmap*absmax
    # (<= 2**-24 * absmax); both relative to absmax since |ratio| <= 1
    bound = error_bound_in_ratio_space(ratio) * a + 2.0**-23 * a
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item()!r}"
    # the bound is attained, not vacuous: somewhere the error is more than 90% of it
    assert bool(((err / bound) > 0.9).any())
    # at ratio -1 the error is the distance to the lowest code, about 0.0070 * absmax
    neg_end = (ratio == -1).nonzero().reshape(-1)
    assert neg_end.numel() > 0
    assert torch.allclose(err[neg_end] / a[neg_end], (1 + QMAP64[0]).expand(neg_end.numel()), rtol=1e-5)
    assert (codes[neg_end] == 0).all()


def test_round_trip_of_map_values_is_exact():
    for absmax in (1.0, 2.0**-30, 2.0**30):
        values = QMAP * absmax
        codes, a = ops.quantize_blockwise(values)
        assert a.item() == absmax
        assert torch.equal(bits(ops.dequantize_blockwise(codes, a, torch.float32)), bits(values))


# --------------------------------------------------------------------------------------------------------
# threads


def test_results_do_not_depend_on_thread_count(gen, restore_threads):
    # big enough that at::parallel_for splits it (> GRAIN_SIZE elements), with a partial last block
    values = torch.randn(600_000 + 77, generator=gen) * (10.0 ** (torch.rand(1, generator=gen) * 4 - 2))
    values[12345] = float("nan")
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        codes, absmax = ops.quantize_blockwise(values)
        back = ops.dequantize_blockwise(codes, absmax, torch.float32)
        results.append((codes, bits(absmax), bits(back)))
    for one, two in zip(*results):
        assert torch.equal(one, two)
