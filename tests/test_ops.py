"""The raw ops: torch.library.opcheck, argument checking, and the GradScaler arguments."""
from __future__ import annotations

import pytest
import torch

import torchsgd8  # noqa: F401  (registers torch.ops.torchsgd8)
from torchsgd8 import ops
from torchsgd8.quantization import ZERO_CODE

OPS = torch.ops.torchsgd8
SIZES = (1, 257, 1000)


def _hyper(lr=0.1, momentum=0.9, dtype=torch.float64):
    return torch.tensor(lr, dtype=dtype), torch.tensor(momentum, dtype=dtype)


def _sgd_args(gen, dtype=torch.float32, momentum=True, first_step=False, nesterov=False, maximize=False,
              sizes=SIZES, hyper_dtype=torch.float64):
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    bufs = [torch.randn(n, generator=gen).to(dtype) for n in sizes] if momentum else []
    lr, mom = _hyper(momentum=0.9 if momentum else 0.0, dtype=hyper_dtype)
    damp = 0.0 if nesterov else 0.1
    return [params, grads, bufs, lr, mom, damp, 0.01, nesterov, maximize, first_step]


def _sgd8_args(gen, dtype=torch.float32, first_step=False, sizes=SIZES, nesterov=False, maximize=False):
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    quantized = [ops.quantize_blockwise(torch.randn(n, generator=gen)) for n in sizes]
    codes = [c for c, _ in quantized]
    absmax = [a for _, a in quantized]
    lr, mom = _hyper()
    return [params, grads, codes, absmax, lr, mom, 0.0 if nesterov else 0.1, 0.01, nesterov, maximize,
            first_step]


# the update ops by name: (argument builder, op, number of state lists after params and grads)
UPDATE_OPS = {"sgd_update_": (_sgd_args, ops.sgd_update_, 1), "sgd8bit_update_": (_sgd8_args, ops.sgd8bit_update_, 2)}

AMP = {
    "no-amp": {},
    "scale": dict(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0)),
    "skip": dict(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0)),
}


def _snapshot(args):
    out = []
    for a in args:
        if isinstance(a, list):
            out.append([t.clone() for t in a])
        elif isinstance(a, torch.Tensor):
            out.append(a.clone())
    return out


def _same_bits(x, y):
    """Bitwise equality (NaNs included) of two tensors of equal dtype and shape."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    return torch.equal(x.contiguous().reshape(-1).view(torch.uint8), y.contiguous().reshape(-1).view(torch.uint8))


def _assert_unchanged(args, snap):
    current = _snapshot(args)
    assert len(current) == len(snap)
    for now, before in zip(current, snap):
        if isinstance(now, list):
            assert len(now) == len(before)
            for x, y in zip(now, before):
                assert _same_bits(x, y)
        else:
            assert _same_bits(now, before)


def _assert_empty_state(args, state_lists):
    """The state lists hold empty momentum: zero buffers; or codes of 0.0 with zero absmax."""
    if state_lists == 1:
        assert all(bool((b == 0).all()) for b in args[2])
    else:
        assert all(bool((c == ZERO_CODE).all()) for c in args[2]) and all(bool((a == 0).all()) for a in args[3])


def _dtype_id(dt):
    return str(dt).split(".")[-1]


# ---- opcheck ------------------------------------------------------------------------------------------------

SGD_SAMPLES = (
    [(dt, m, fs, "no-amp") for dt in (torch.float32, torch.bfloat16, torch.float64)
     for m, fs in ((True, False), (True, True), (False, False))]
    + [(torch.float32, m, fs, amp) for m, fs in ((True, False), (True, True), (False, False))
       for amp in ("scale", "skip")]
)


@pytest.mark.parametrize("dtype,momentum,first_step,amp", SGD_SAMPLES,
                         ids=[f"{_dtype_id(d)}-{'mom' if m else 'nomom'}-{'first' if f else 'later'}-{a}"
                              for d, m, f, a in SGD_SAMPLES])
def test_opcheck_sgd_update(dtype, momentum, first_step, amp, gen):
    args = _sgd_args(gen, dtype, momentum, first_step, nesterov=dtype == torch.bfloat16,
                     maximize=dtype == torch.float64)
    torch.library.opcheck(OPS.sgd_update_.default, tuple(args), AMP[amp])


@pytest.mark.parametrize("momentum", [True, False])
def test_opcheck_sgd_update_empty_list(momentum):
    lr, mom = _hyper(momentum=0.9 if momentum else 0.0)
    torch.library.opcheck(OPS.sgd_update_.default, ([], [], [], lr, mom, 0.0, 0.0, False, False, momentum))


def test_opcheck_sgd_update_float32_hyperparameters_and_2d(gen):
    args = _sgd_args(gen, sizes=(1,), hyper_dtype=torch.float32)
    args[0].append(torch.randn(33, 65, generator=gen))
    args[1].append(torch.randn(33, 65, generator=gen))
    args[2].append(torch.randn(33, 65, generator=gen))
    torch.library.opcheck(OPS.sgd_update_.default, tuple(args))


SGD8_SAMPLES = (
    [(dt, fs, "no-amp") for dt in (torch.float32, torch.bfloat16, torch.float16) for fs in (False, True)]
    + [(torch.float32, False, amp) for amp in ("scale", "skip")]
)


@pytest.mark.parametrize("dtype,first_step,amp", SGD8_SAMPLES,
                         ids=[f"{_dtype_id(d)}-{'first' if f else 'later'}-{a}" for d, f, a in SGD8_SAMPLES])
def test_opcheck_sgd8bit_update(dtype, first_step, amp, gen):
    args = _sgd8_args(gen, dtype, first_step, nesterov=dtype == torch.bfloat16)
    torch.library.opcheck(OPS.sgd8bit_update_.default, tuple(args), AMP[amp])


@pytest.mark.parametrize("first_step", [False, True], ids=["later", "first"])
def test_opcheck_sgd8bit_update_per_row_absmax(first_step, gen):
    """2-D params with (rows, blocks per row) absmax, beside a flat one, in one call."""
    shapes = [(3, 300), (0, 300), (2, 512), (700,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    quantized = [ops.quantize_blockwise(torch.randn(s, generator=gen), per_row=len(s) == 2) for s in shapes]
    assert [tuple(a.shape) for _, a in quantized] == [(3, 2), (0, 2), (2, 2), (3,)]
    lr, mom = _hyper()
    args = (params, grads, [c for c, _ in quantized], [a for _, a in quantized], lr, mom, 0.1, 0.01, False, False,
            first_step)
    torch.library.opcheck(OPS.sgd8bit_update_.default, args)


def test_opcheck_sgd8bit_update_empty_list():
    lr, mom = _hyper()
    torch.library.opcheck(OPS.sgd8bit_update_.default, ([], [], [], [], lr, mom, 0.0, 0.0, False, False, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("shape", [(1,), (257,), (1000,), (33, 65), (0,)], ids=str)
def test_opcheck_quantize_blockwise(shape, dtype, gen):
    torch.library.opcheck(OPS.quantize_blockwise.default, (torch.randn(shape, generator=gen).to(dtype),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
@pytest.mark.parametrize("shape", [(1, 1), (3, 257), (4, 5, 60), (0, 300), (2, 512)], ids=str)
def test_opcheck_quantize_and_dequantize_per_row(shape, dtype, gen):
    values = torch.randn(shape, generator=gen).to(dtype)
    torch.library.opcheck(OPS.quantize_blockwise.default, (values, True))
    codes, absmax = ops.quantize_blockwise(values, per_row=True)
    torch.library.opcheck(OPS.dequantize_blockwise.default, (codes, absmax, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("shape", [(1,), (257,), (1000,), (33, 65)], ids=str)
def test_opcheck_dequantize_blockwise(shape, dtype, gen):
    codes, absmax = ops.quantize_blockwise(torch.randn(shape, generator=gen))
    torch.library.opcheck(OPS.dequantize_blockwise.default, (codes, absmax, dtype))


@pytest.mark.parametrize("amp", ["no-amp", "scale", "skip"])
@pytest.mark.parametrize("first_step", [False, True], ids=["later", "first"])
def test_opcheck_sgd8bit_update_with_step_counters(first_step, amp, gen):
    args = _sgd8_args(gen, first_step=first_step)
    steps = [torch.tensor(3.0), torch.tensor(0.0), torch.zeros(1)]  # 0-dim and one-element counters
    torch.library.opcheck(OPS.sgd8bit_update_.default, tuple(args), dict(AMP[amp], steps=steps))


def test_opcheck_grads_fit(gen):
    params = [torch.randn(3, generator=gen, requires_grad=True), torch.randn(2, 5, generator=gen)]
    grads = [torch.randn(3, generator=gen), torch.randn(2, 5, generator=gen)]
    torch.library.opcheck(OPS.grads_fit.default, (params, grads))
    torch.library.opcheck(OPS.grads_fit.default, ([], []))


def _fitting_pair(gen):
    return [torch.randn(3, generator=gen), torch.randn(4, 6, generator=gen)], \
        [torch.randn(3, generator=gen), torch.randn(4, 6, generator=gen)]


# What makes ops.grads_fit false: fn(params, grads) changes the second pair (or the lists).
GRAD_MISFITS = {
    "shape": lambda ps, gs: gs.__setitem__(1, torch.zeros(6, 4)),
    "dtype": lambda ps, gs: gs.__setitem__(1, gs[1].double()),
    "device": lambda ps, gs: gs.__setitem__(1, torch.zeros(4, 6, device="meta")),
    "param device": lambda ps, gs: (ps.__setitem__(1, torch.zeros(4, 6, device="meta")),
                                    gs.__setitem__(1, torch.zeros(4, 6, device="meta"))),
    "sparse grad": lambda ps, gs: gs.__setitem__(1, gs[1].to_sparse()),
    "strided grad": lambda ps, gs: gs.__setitem__(1, torch.zeros(6, 4).t()),
    "strided param": lambda ps, gs: ps.__setitem__(1, torch.zeros(6, 4).t()),
    "fewer grads": lambda ps, gs: gs.pop(),
}


@pytest.mark.parametrize("misfit", GRAD_MISFITS, ids=list(GRAD_MISFITS))
def test_grads_fit_is_false_for_each_misfit_and_true_otherwise(misfit, gen):
    params, grads = _fitting_pair(gen)
    assert ops.grads_fit(params, grads)
    assert ops.grads_fit(params[::-1], grads[::-1])  # params may differ in shape and dtype from each other
    assert ops.grads_fit([params[0], params[1].double()], [grads[0], grads[1].double()])
    GRAD_MISFITS[misfit](params, grads)
    assert not ops.grads_fit(params, grads)
    assert ops.grads_fit([], [])


def test_sgd8bit_update_counts_steps_unless_the_step_is_skipped(gen):
    args = _sgd8_args(gen, first_step=True)
    base = torch.zeros(4)
    steps = [torch.tensor(3.0), torch.tensor([7.0]), base[2]]  # 0-dim, one element, a view of another tensor
    versions = [s._version for s in steps]
    ops.sgd8bit_update_(*args, steps=steps)  # a first step counts too
    assert [s.item() for s in steps] == [4.0, 8.0, 1.0]
    assert base.tolist() == [0.0, 0.0, 1.0, 0.0]  # the view's own element only
    assert all(s._version > v for s, v in zip(steps, versions))  # written, as autograd must know
    args[-1] = False
    ops.sgd8bit_update_(*args, found_inf=torch.tensor(0.0), steps=steps)
    assert [s.item() for s in steps] == [5.0, 9.0, 2.0]
    snap = _snapshot(args)
    ops.sgd8bit_update_(*args, found_inf=torch.tensor(1.0), steps=steps)  # skipped: nothing changes, no count
    assert [s.item() for s in steps] == [5.0, 9.0, 2.0]
    _assert_unchanged(args, snap)
    ops.sgd8bit_update_(*args)  # without counters: the same update, nothing counted
    assert [s.item() for s in steps] == [5.0, 9.0, 2.0]
    assert not _same_bits(args[0][2], snap[0][2])


def test_sgd8bit_update_with_and_without_step_counters_is_bitwise_the_same(gen):
    args = _sgd8_args(gen)
    other = [[t.clone() for t in a] if isinstance(a, list) else a for a in args]
    ops.sgd8bit_update_(*args, steps=[torch.zeros(()) for _ in args[0]])
    ops.sgd8bit_update_(*other)
    _assert_unchanged(args, _snapshot(other))  # args hold bit for bit what the call without counters left


# ---- bad arguments: RuntimeError with a helpful message, nothing changed -----------------------------------


def _bad_update_cases():
    """(op, id, mutate(args), message regex); the offending tensor is the last of three, so a partial update
    of the first ones would show."""
    def shorten(index):
        def mutate(a):
            a[index].pop()
        return mutate

    def replace_last(index, make):
        def mutate(a):
            a[index][2] = make(a[index][2])
        return mutate

    def two_elements(index):  # a hyperparameter tensor of 2 elements
        def mutate(a):
            a[index] = torch.tensor([0.1, 0.2], dtype=torch.float64)
        return mutate

    def noncontig_param(a):
        a[0][2] = torch.randn(40, 25).t()
        a[1][2] = torch.randn(25, 40)
        a[2][2] = torch.randn(25, 40)

    def int_param(a):
        a[0][2] = torch.zeros(1000, dtype=torch.int32)
        a[1][2] = torch.zeros(1000, dtype=torch.int32)

    def mixed_dtype(a):
        for i in range(3):
            a[i][2] = a[i][2].double()

    def fp64(a):
        a[0] = [p.double() for p in a[0]]
        a[1] = [g.double() for g in a[1]]

    grad_shape = replace_last(1, lambda g: torch.randn(999))
    sgd = [
        ("grads-short", shorten(1), r"3 params but 2 grads"),
        ("buffers-short", shorten(2), r"3 params but 2 momentum_buffers"),
        ("grad-shape", grad_shape, r"grad 2 .*must match its param"),
        ("grad-dtype", replace_last(1, lambda g: g.double()), r"grad 2 .*must match its param"),
        ("noncontig-param", noncontig_param, r"param 2 is not contiguous"),
        ("noncontig-grad", replace_last(1, lambda g: torch.randn(2000)[::2]), r"grad 2 is not contiguous"),
        ("buffer-dtype", replace_last(2, lambda b: b.double()), r"momentum_buffers\[2\] must have its param's dtype"),
        ("buffer-shape", replace_last(2, lambda b: torch.randn(10, 100)),
         r"momentum_buffers\[2\] must be contiguous with its param's shape"),
        ("int-param", int_param, r"params must be float32, float64, bfloat16, float16 or complex; param 2"),
        ("mixed-dtype", mixed_dtype, r"share device and dtype; param 2"),
        ("lr-2-elements", two_elements(3), r"lr must be a 1-element tensor"),
        ("momentum-2-elements", two_elements(4), r"momentum must be a 1-element tensor"),
    ]
    sgd8 = [
        ("codes-int8", replace_last(2, lambda c: c.to(torch.int8)), r"codes\[2\] must be uint8"),
        ("codes-float", replace_last(2, lambda c: c.float()), r"codes\[2\] must be uint8"),
        ("codes-shape", replace_last(2, lambda c: c.reshape(10, 100)),
         r"codes\[2\] must be contiguous with its param's shape"),
        ("absmax-length", replace_last(3, lambda a: torch.ones(3)),
         r"absmax\[2\] must hold one float32 per 256-element block of its 1000 codes \(shape \[1000\]\): "
         r"shape \[4\] \(flat\); got shape \[3\]"),
        ("absmax-dtype", replace_last(3, lambda a: a.double()),
         r"absmax\[2\] must be a contiguous float32 tensor on cpu; got Double"),
        ("absmax-list-short", shorten(3), r"3 params but 2 absmax"),
        ("codes-list-short", shorten(2), r"3 params but 2 codes"),
        ("float64-param", fp64, r"8-bit state is for float32/bfloat16/float16 params"),
        ("lr-2-elements", two_elements(4), r"lr must be a 1-element tensor"),
        ("grad-shape", grad_shape, r"grad 2 .*must match its param"),
    ]
    return [("sgd_update_", *case) for case in sgd] + [("sgd8bit_update_", *case) for case in sgd8]


BAD_UPDATE_CASES = _bad_update_cases()


@pytest.mark.parametrize("which,name,mutate,message", BAD_UPDATE_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in BAD_UPDATE_CASES])
def test_update_ops_reject_bad_arguments(which, name, mutate, message, gen):
    make_args, op, _ = UPDATE_OPS[which]
    args = make_args(gen)
    mutate(args)
    snap = _snapshot(args)
    with pytest.raises(RuntimeError, match=message):
        op(*args)
    _assert_unchanged(args, snap)


@pytest.mark.parametrize("bad, message", [
    ([torch.tensor(1, dtype=torch.int64), torch.zeros(())],
     r"steps\[1\] must be a one-element float32 CPU tensor; got Long"),
    ([torch.tensor(1.0, dtype=torch.float64), torch.zeros(())],
     r"steps\[1\] must be a one-element float32 CPU tensor; got Double"),
    ([torch.zeros(2), torch.zeros(())], r"steps\[1\] must be a one-element float32 CPU tensor; got Float of 2 elements"),
    ([torch.zeros((), device="meta"), torch.zeros(())],
     r"steps\[1\] must be a one-element float32 CPU tensor; got Float of 1 elements on meta"),
    ([torch.zeros(())] * 3, r"got 3 params but 4 steps"),
    ([torch.zeros(())], r"got 3 params but 2 steps"),
], ids=["int64", "float64", "two-elements", "meta", "too-many", "too-few"])
def test_sgd8bit_update_rejects_bad_step_counters_and_changes_nothing(bad, message, gen):
    args = _sgd8_args(gen)
    steps = [torch.tensor(5.0), *bad]
    snap = _snapshot(args)
    with pytest.raises(RuntimeError, match=message):
        ops.sgd8bit_update_(*args, steps=steps)
    _assert_unchanged(args, snap)
    assert steps[0].item() == 5.0


def test_quantize_dequantize_reject_bad_arguments(gen):
    with pytest.raises(RuntimeError, match="values must be float32"):
        ops.quantize_blockwise(torch.zeros(10, dtype=torch.int64))
    codes, absmax = ops.quantize_blockwise(torch.randn(600, generator=gen))
    with pytest.raises(RuntimeError, match="codes must be uint8"):
        ops.dequantize_blockwise(codes.float(), absmax)
    with pytest.raises(RuntimeError, match=r"absmax must hold one float32 per 256-element block of its 600 codes "
                                           r"\(shape \[600\]\): shape \[3\] \(flat\); got shape \[2\]"):
        ops.dequantize_blockwise(codes, absmax[:2])
    with pytest.raises(RuntimeError, match=r"absmax must hold one float32 per 256-element block of its 600 codes "
                                           r"\(shape \[2, 300\]\): shape \[3\] \(flat\) or \[2, 2\] \(blocks within each "
                                           r"row of dim 0\); got shape \[2, 3\]"):
        ops.dequantize_blockwise(codes.reshape(2, 300), torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match="absmax must be float32"):
        ops.dequantize_blockwise(codes, absmax.double())
    with pytest.raises(RuntimeError, match="dtype must be float32"):
        ops.dequantize_blockwise(codes, absmax, torch.int32)


# ---- found_inf / grad_scale ---------------------------------------------------------------------------------


@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize("which", ["sgd_update_", "sgd8bit_update_"])
def test_found_inf_leaves_everything_untouched(which, first_step, gen):
    make, op, state_lists = UPDATE_OPS[which]
    args = make(gen, first_step=first_step)
    args[1][0][0] = float("nan")  # what GradScaler would have found
    args[1][1][5] = float("inf")
    if first_step:
        # a first step's state is output only: garbage in it must not matter, and a skipped first step
        # leaves it empty (zeros; the code of 0.0), so an optimizer may allocate it uninitialised
        for state in args[2:2 + state_lists]:
            for t in state:
                t.view(torch.uint8).fill_(0xFF)  # NaN floats, code 255
    snap = _snapshot(args)
    op(*args, grad_scale=torch.tensor(65536.0), found_inf=torch.tensor(1.0))
    if first_step:
        _assert_empty_state(args, state_lists)
        _assert_unchanged(args[:2] + args[2 + state_lists:], snap[:2] + snap[2 + state_lists:])
    else:
        _assert_unchanged(args, snap)
    # the same call with found_inf == 0 does update (so the check above is not vacuous)
    args[1][0][0] = args[1][1][5] = 0.0
    op(*args, grad_scale=torch.tensor(65536.0), found_inf=torch.tensor(0.0))
    assert not torch.equal(args[0][2], snap[0][2])


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic-rounding"])
@pytest.mark.parametrize("which", ["sgd_update_", "sgd8bit_update_"])
def test_first_step_with_momentum_value_0_writes_empty_state(which, stochastic, gen):
    """A scheduled momentum tensor may be 0 on a param's first step: the update is plain SGD and the state
    (allocated uninitialised, here filled with garbage) comes out as empty momentum."""
    make, op, state_lists = UPDATE_OPS[which]
    dtype = torch.bfloat16 if stochastic else torch.float32
    args = make(gen, dtype, first_step=True)
    lists = 2 + state_lists  # params, grads, then the state lists
    args[lists + 1] = torch.tensor(0.0, dtype=torch.float64)  # momentum
    for state in args[2:lists]:
        for t in state:
            t.view(torch.uint8).fill_(0xFF)
    params = [p.clone() for p in args[0]]
    seed = torch.tensor(7) if stochastic else None
    op(*args, rounding_seed=seed)
    _assert_empty_state(args, state_lists)
    lr, weight_decay = args[lists].item(), args[lists + 3]
    for p, before, g in zip(args[0], params, args[1]):
        want = before.float() - lr * (g.float() + weight_decay * before.float())
        # bf16 with stochastic rounding: within one bf16 spacing (2**-7 relative)
        torch.testing.assert_close(p.float(), want, rtol=2**-7 if stochastic else 0, atol=1e-6)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 3.0), (torch.float64, 3.0), (torch.bfloat16, 1024.0),
                                         (torch.float16, 4.0)], ids=lambda v: str(v))
@pytest.mark.parametrize("first_step", [False, True])
def test_grad_scale_divides_grads(dtype, scale, first_step, gen):
    args = _sgd_args(gen, dtype, first_step=first_step)
    scaled = [g * scale for g in args[1]]
    # manual unscale; bf16/fp16 use power-of-two scales, so dividing in the low dtype is exact too
    manual = [g / scale for g in scaled]
    expected = _snapshot(args)
    expected[1] = manual
    ops.sgd_update_(*expected[:3], *args[3:])
    before = args[0][2].clone()
    ops.sgd_update_(args[0], scaled, args[2], *args[3:], grad_scale=torch.tensor(scale))
    for got, want in zip(args[0] + args[2], expected[0] + expected[2]):
        assert torch.equal(got, want)
    assert not torch.equal(args[0][2], before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_grad_scale_divides_grads_8bit(dtype, gen):
    args = _sgd8_args(gen, dtype)
    scale = 512.0
    expected = _snapshot(args)
    ops.sgd8bit_update_(*expected[:4], *args[4:])
    before = args[0][2].clone()
    ops.sgd8bit_update_(args[0], [g * scale for g in args[1]], args[2], args[3], *args[4:],
                        grad_scale=torch.tensor(scale))
    for got, want in zip(args[0] + args[2] + args[3], expected[0] + expected[2] + expected[3]):
        assert torch.equal(got, want)
    assert not torch.equal(args[0][2], before)


def test_first_step_does_not_read_buffers(gen):
    args = _sgd_args(gen, first_step=True)
    for b in args[2]:
        b.fill_(float("nan"))
    params = [p.clone() for p in args[0]]
    ops.sgd_update_(*args)
    lr, wd = float(args[3]), args[6]
    for p0, g, b, p in zip(params, args[1], args[2], args[0]):
        d = g + wd * p0
        torch.testing.assert_close(b, d, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p, p0 - lr * d, rtol=1e-6, atol=1e-6)
