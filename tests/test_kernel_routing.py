"""Which kernels the public ops call, and the contract they keep around them on every route.

The public ops (csrc/op_contract.cpp) run the compiled C++ kernels for CPU tensors, and the kernel ops
(torchsgd8::_*_kernel_) for devices whose kernels are not C++: the GPU's Triton kernels, registered from
Python. CPU tensors take the kernel-op route too where a kernel op has a CPU kernel, which only tests
register. Here the kernel ops get Python CPU kernels written with plain torch ops (a small float reference,
for these tests only), so the GPU path - argument checks, real views of complex tensors, the state of a
skipped first step, the step counters, all without reading a value on the host - runs on this machine.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch

from torchsgd8 import _C, ops
from torchsgd8 import triton as triton_kernels

OPS = torch.ops.torchsgd8
KERNEL_OPS = ("_sgd_update_kernel_", "_sgd8bit_update_kernel_", "_quantize_blockwise_kernel_",
              "_dequantize_blockwise_kernel_")
_TABLES = _C.quant_tables()
QMAP = torch.frombuffer(bytearray(_TABLES["signed_dynamic_map"]), dtype=torch.float32)
BLOCK_SIZE = _TABLES["block_size"]
ZERO_CODE = _TABLES["zero_code"]


# ---- the reference kernels -------------------------------------------------------------------------------


def _block_index(shape, absmax):
    """The index into absmax.reshape(-1) of every element of a tensor of `shape` (flattened): absmax a
    vector for flat blocks, a (rows, blocks per row) matrix for blocks within each index of dim 0."""
    numel = math.prod(shape)
    element = torch.arange(numel)
    if absmax.dim() == 1:
        return element // BLOCK_SIZE
    row_length = numel // absmax.shape[0]
    return (element // row_length) * absmax.shape[1] + (element % row_length) // BLOCK_SIZE


def _dequantize(codes, absmax):
    if codes.numel() == 0:
        return torch.zeros(codes.shape)
    values = QMAP[codes.reshape(-1).long()] * absmax.reshape(-1)[_block_index(codes.shape, absmax)]
    return values.reshape(codes.shape)


def _quantize_into(values, codes, absmax):
    """Blockwise absmax and nearest codes (by brute force; ties, which random data does not produce, aside)."""
    if values.numel() == 0:
        return
    flat = values.reshape(-1).float()
    block = _block_index(values.shape, absmax)
    block_absmax = torch.zeros(absmax.numel()).scatter_reduce(0, block, flat.abs(), "amax")
    scale = block_absmax[block]
    x = torch.where(scale > 0, flat / torch.where(scale > 0, scale, 1.0), 0.0)
    codes.copy_((QMAP[None, :] - x[:, None]).abs().argmin(dim=1).to(torch.uint8).reshape(codes.shape))
    absmax.copy_(block_absmax.reshape(absmax.shape))


def _sgd_rule(p, g, buf, *, lr, momentum, dampening, weight_decay, nesterov, maximize, first_step, grad_scale):
    """torch.optim.SGD's rule; buf None: no momentum. Returns (new param, new buffer)."""
    d = g if grad_scale is None else g / grad_scale
    d = -d if maximize else d
    if weight_decay != 0:
        d = d + weight_decay * p
    if buf is not None:
        buf = d if first_step else momentum * buf + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return p - lr * d, buf


class ReferenceKernels:
    """CPU kernels for the kernel ops, with their contract (ops.cpp), and a record of every call. Unlike a
    GPU kernel, they read found_inf and the hyperparameters on the host: these are CPU tensors here."""

    def __init__(self):
        self.calls = []

    def _hyper(self, name, args):
        self.calls.append((name, args))
        assert args["rounding_seed"] is None, "the reference kernels do not round stochastically"
        if args["found_inf"] is not None and args["found_inf"].item() != 0:
            return None  # a skipped step writes nothing
        return dict(lr=args["lr"].item(), momentum=args["momentum"].item(), dampening=args["dampening"],
                    weight_decay=args["weight_decay"], nesterov=args["nesterov"], maximize=args["maximize"],
                    first_step=args["first_step"],
                    grad_scale=None if args["grad_scale"] is None else args["grad_scale"].item())

    def sgd_update(self, params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov,
                   maximize, first_step, grad_scale, found_inf, rounding_seed):
        hyper = self._hyper("_sgd_update_kernel_", dict(locals()))
        if hyper is None:
            return
        for i, (p, g) in enumerate(zip(params, grads)):
            acc = torch.float64 if p.dtype == torch.float64 else torch.float32
            with_buffer = bool(momentum_buffers) and hyper["momentum"] != 0  # momentum 0: buffers untouched
            new_p, new_buf = _sgd_rule(p.to(acc), g.to(acc), momentum_buffers[i].to(acc) if with_buffer else None,
                                       **hyper)
            p.copy_(new_p)
            if with_buffer:
                momentum_buffers[i].copy_(new_buf)

    def sgd8bit_update(self, params, grads, codes, absmax, lr, momentum, dampening, weight_decay, nesterov,
                       maximize, first_step, grad_scale, found_inf, rounding_seed):
        hyper = self._hyper("_sgd8bit_update_kernel_", dict(locals()))
        if hyper is None:
            return
        for p, g, c, a in zip(params, grads, codes, absmax):
            old = torch.zeros(p.shape) if first_step else _dequantize(c, a)
            # momentum 0: the state is written all the same, as the CPU kernels do (zeros, or requantized)
            new_p, new_buf = _sgd_rule(p.float(), g.float(), old if hyper["momentum"] != 0 else None, **hyper)
            p.copy_(new_p)
            _quantize_into(old if new_buf is None else new_buf, c, a)

    def quantize_blockwise(self, values, codes, absmax):
        self.calls.append(("_quantize_blockwise_kernel_", dict(values=values, codes=codes, absmax=absmax)))
        _quantize_into(values, codes, absmax)

    def dequantize_blockwise(self, codes, absmax, out):
        self.calls.append(("_dequantize_blockwise_kernel_", dict(codes=codes, absmax=absmax, out=out)))
        out.copy_(_dequantize(codes, absmax))


@contextlib.contextmanager
def _kernel_ops_for(dispatch_key):
    kernels = ReferenceKernels()
    lib = torch.library.Library("torchsgd8", "IMPL")
    try:
        for name, fn in zip(KERNEL_OPS, (kernels.sgd_update, kernels.sgd8bit_update, kernels.quantize_blockwise,
                                         kernels.dequantize_blockwise)):
            lib.impl(name, fn, dispatch_key)
        yield kernels
    finally:
        lib._destroy()


@pytest.fixture
def kernel_ops_on_cpu():
    """The reference kernels as the kernel ops' CPU kernels, for the test only."""
    with _kernel_ops_for("CPU") as kernels:
        yield kernels


# ---- arguments -------------------------------------------------------------------------------------------


def _sgd_args(gen, sizes=(1, 257, 1000), dtype=torch.float32, first_step=False, momentum=0.9):
    params = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    bufs = [torch.full_like(p, float("nan")) if first_step else torch.randn(p.shape, generator=gen, dtype=dtype)
            for p in params]  # NaN: a first step's buffers are uninitialised memory
    return [params, grads, bufs, torch.tensor(0.1, dtype=torch.float64), torch.tensor(momentum, dtype=torch.float64),
            0.1, 0.01, False, False, first_step]


def _sgd8_args(gen, shapes=((1,), (3, 300), (700,)), first_step=False, momentum=0.9):
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    if first_step:  # uninitialised: anything but empty momentum
        codes = [torch.randint(0, 256, s, generator=gen, dtype=torch.uint8) for s in shapes]
        absmax = [torch.full(ops.absmax_shape(s, len(s) >= 2), 3.0) for s in shapes]
    else:
        quantized = [ops.quantize_blockwise(torch.randn(s, generator=gen), per_row=len(s) >= 2) for s in shapes]
        codes, absmax = [c for c, _ in quantized], [a for _, a in quantized]
    return [params, grads, codes, absmax, torch.tensor(0.1, dtype=torch.float64),
            torch.tensor(momentum, dtype=torch.float64), 0.0, 0.01, True, False, first_step]


def _clone(args):
    return [[t.clone() for t in a] if isinstance(a, list) else a.clone() if isinstance(a, torch.Tensor) else a
            for a in args]


def _assert_same_bits(xs, ys):
    for x, y in zip(xs, ys):
        assert torch.equal(x.view(torch.uint8) if x.dtype != torch.uint8 else x,
                           y.view(torch.uint8) if y.dtype != torch.uint8 else y)


def _assert_close_state(codes, absmax, ref_codes, ref_absmax):
    """8-bit states alike up to a code here and there (the reference's float arithmetic is not the kernels')."""
    for c, a, rc, ra in zip(codes, absmax, ref_codes, ref_absmax):
        torch.testing.assert_close(a, ra)
        torch.testing.assert_close(_dequantize(c, a), _dequantize(rc, ra), atol=0.02 * ra.max().item(), rtol=0)


# ---- routing ---------------------------------------------------------------------------------------------


def test_production_registers_no_cpu_kernel_op_and_cpu_calls_use_the_compiled_kernels(gen):
    for name in KERNEL_OPS:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"torchsgd8::{name}", "CPU")
    with _kernel_ops_for("CPU") as kernels:
        OPS.sgd_update_(*_sgd_args(gen))
        assert [name for name, _ in kernels.calls] == ["_sgd_update_kernel_"]
    for name in KERNEL_OPS:  # the registration went with the library object
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"torchsgd8::{name}", "CPU")
    # every op runs, though the kernel ops have no CPU kernel: the compiled kernels serve it, unrecorded
    OPS.sgd_update_(*_sgd_args(gen))
    OPS.sgd8bit_update_(*_sgd8_args(gen), steps=[torch.zeros(()) for _ in range(3)])
    codes, absmax = ops.quantize_blockwise(torch.randn(2, 300, generator=gen), per_row=True)
    ops.dequantize_blockwise(codes, absmax)
    assert [name for name, _ in kernels.calls] == ["_sgd_update_kernel_"]


def test_the_triton_kernels_are_the_kernel_ops_of_cuda_and_xpu():
    """import torchsgd8 registers them (importing triton only when one is first called)."""
    for name in KERNEL_OPS:
        for key in ("CUDA", "XPU"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchsgd8::{name}", key), (name, key)


@pytest.fixture
def without_gpu_kernels():
    """Removes the kernel ops' CUDA and XPU kernels (torchsgd8.ops registers the Triton ones) for one test."""
    ops._GPU_KERNELS._destroy()
    try:
        yield
    finally:
        ops._GPU_KERNELS = torch.library.Library("torchsgd8", "IMPL")
        for key in ("CUDA", "XPU"):
            triton_kernels.register_kernels(ops._GPU_KERNELS, key)


@pytest.mark.parametrize("op", ["sgd_update_", "sgd8bit_update_", "quantize_blockwise", "dequantize_blockwise"])
@pytest.mark.parametrize("device", ["CUDA", "XPU"])
def test_a_device_without_kernels_raises_naming_it_and_changes_nothing(op, device, gen, without_gpu_kernels):
    """The ops' CUDA and XPU kernels exist in every build; without a kernel op for the device they raise.
    Called here by redispatching CPU tensors to that dispatch key (no such device on this machine)."""
    args = {"sgd_update_": lambda: _sgd_args(gen),
            "sgd8bit_update_": lambda: _sgd8_args(gen),
            "quantize_blockwise": lambda: [torch.randn(600, generator=gen), False],
            "dequantize_blockwise": lambda: [*ops.quantize_blockwise(torch.randn(600, generator=gen)), torch.float32],
            }[op]()
    before = _clone(args)
    keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, device))
    with pytest.raises(NotImplementedError, match=f"torchsgd8: no kernels for device {device.lower()}: the GPU "
                                                  "kernels are Triton kernels; install triton"):
        getattr(OPS, op).default.redispatch(keys, *args)
    for a, b in zip(args, before):
        if isinstance(a, list):
            _assert_same_bits(a, b)


def test_a_device_with_a_kernel_op_runs_the_contract_of_that_device(gen):
    """sgd8bit_update_'s CUDA kernel, given a CUDA kernel op, runs the GPU route's contract; its call of the
    kernel op is dispatched by the tensors' device like any other (the CPU here)."""
    args = _sgd8_args(gen, first_step=True)
    steps = [torch.zeros(()) for _ in range(3)]
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with _kernel_ops_for("CUDA") as cuda_kernels, _kernel_ops_for("CPU") as cpu_kernels:
        OPS.sgd8bit_update_.default.redispatch(keys, *args, None, torch.tensor([1.0]), None, steps)
    assert not cuda_kernels.calls  # these are CPU tensors
    assert [name for name, _ in cpu_kernels.calls] == ["_sgd8bit_update_kernel_"]
    assert all((c == ZERO_CODE).all() for c in args[2]) and all((a == 0).all() for a in args[3])
    assert [s.item() for s in steps] == [0.0] * 3


# ---- the contract on the kernel-op route ----------------------------------------------------------------------


@pytest.mark.parametrize("op", ["sgd_update_", "sgd8bit_update_"])
def test_kernel_ops_receive_the_callers_tensors_untouched(op, kernel_ops_on_cpu, gen):
    args = _sgd_args(gen) if op == "sgd_update_" else _sgd8_args(gen)
    grad_scale, found_inf = torch.tensor(2.0), torch.tensor([0.0])  # found_inf as GradScaler makes it, shape (1,)
    kernel_ops_on_cpu.calls.clear()  # _sgd8_args quantizes
    getattr(OPS, op)(*args, grad_scale=grad_scale, found_inf=found_inf)
    [(name, received)] = kernel_ops_on_cpu.calls
    assert name == f"_{op}kernel_"
    lists = ("params", "grads", "momentum_buffers") if op == "sgd_update_" else (
        "params", "grads", "codes", "absmax")
    for i, key in enumerate(lists):
        assert len(received[key]) == len(args[i]) and all(r is a for r, a in zip(received[key], args[i])), key
    lr, momentum = args[len(lists)], args[len(lists) + 1]
    assert received["lr"] is lr and received["momentum"] is momentum
    assert received["grad_scale"] is grad_scale and received["found_inf"] is found_inf
    assert received["rounding_seed"] is None


@pytest.mark.parametrize("first_step", [False, True], ids=["later", "first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sgd_update_on_the_kernel_op_route_matches_the_compiled_kernels(dtype, first_step, gen):
    args = _sgd_args(gen, dtype=dtype, first_step=first_step)
    expected = _clone(args)
    OPS.sgd_update_(*expected, grad_scale=torch.tensor(2.0))
    with _kernel_ops_for("CPU") as kernels:
        OPS.sgd_update_(*args, grad_scale=torch.tensor(2.0))
    assert len(kernels.calls) == 1
    torch.testing.assert_close(args[0], expected[0])
    torch.testing.assert_close(args[2], expected[2])


@pytest.mark.parametrize("first_step", [False, True], ids=["later", "first"])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_sgd8bit_update_on_the_kernel_op_route_matches_the_compiled_kernels(momentum, first_step, gen):
    args = _sgd8_args(gen, first_step=first_step, momentum=momentum)
    expected = _clone(args)
    OPS.sgd8bit_update_(*expected)
    with _kernel_ops_for("CPU") as kernels:
        OPS.sgd8bit_update_(*args)
    assert len(kernels.calls) == 1
    torch.testing.assert_close(args[0], expected[0])
    _assert_close_state(args[2], args[3], expected[2], expected[3])


@pytest.mark.parametrize("per_row", [False, True])
def test_quantize_and_dequantize_on_the_kernel_op_route_match_the_compiled_kernels(per_row, gen):
    values = torch.randn(3, 700, generator=gen, dtype=torch.bfloat16).t()  # not contiguous
    expected_codes, expected_absmax = ops.quantize_blockwise(values, per_row=per_row)
    expected_values = ops.dequantize_blockwise(expected_codes, expected_absmax, torch.float16)
    with _kernel_ops_for("CPU") as kernels:
        codes, absmax = ops.quantize_blockwise(values, per_row=per_row)
        dequantized = ops.dequantize_blockwise(codes, absmax, torch.float16)
    assert [name for name, _ in kernels.calls] == ["_quantize_blockwise_kernel_", "_dequantize_blockwise_kernel_"]
    assert kernels.calls[0][1]["values"].is_contiguous()
    assert (codes.shape, codes.dtype, absmax.shape, dequantized.dtype) == (
        expected_codes.shape, torch.uint8, expected_absmax.shape, torch.float16)
    _assert_close_state([codes], [absmax], [expected_codes], [expected_absmax])
    torch.testing.assert_close(dequantized, expected_values, atol=0.02 * absmax.max().item(), rtol=0)


@pytest.mark.parametrize("op", ["sgd_update_", "sgd8bit_update_"])
def test_skipped_first_step_leaves_params_and_empty_momentum(op, kernel_ops_on_cpu, gen):
    """found_inf nonzero: the kernel writes nothing; the first step's uninitialised state becomes empty
    momentum (buffers 0; codes 127, absmax 0) by device-side ops of the public op, counters stay."""
    args = _sgd_args(gen, first_step=True) if op == "sgd_update_" else _sgd8_args(gen, first_step=True)
    params = [p.clone() for p in args[0]]
    steps = [torch.tensor(4.0), torch.tensor([4.0]), torch.tensor(4.0)]
    extra = {} if op == "sgd_update_" else {"steps": steps}
    kernel_ops_on_cpu.calls.clear()
    getattr(OPS, op)(*args, grad_scale=torch.tensor(8.0), found_inf=torch.tensor([1.0]), **extra)
    assert len(kernel_ops_on_cpu.calls) == 1
    _assert_same_bits(args[0], params)
    if op == "sgd_update_":
        assert all(torch.equal(b, torch.zeros_like(b)) for b in args[2])
    else:
        assert all((c == ZERO_CODE).all() for c in args[2]) and all((a == 0).all() for a in args[3])
        assert [s.item() for s in steps] == [4.0] * 3


@pytest.mark.parametrize("op", ["sgd_update_", "sgd8bit_update_"])
def test_skipped_later_step_changes_nothing(op, kernel_ops_on_cpu, gen):
    args = _sgd_args(gen) if op == "sgd_update_" else _sgd8_args(gen)
    before = _clone(args)
    getattr(OPS, op)(*args, found_inf=torch.tensor([float("inf")]))
    for a, b in zip(args, before):
        if isinstance(a, list):
            _assert_same_bits(a, b)


def test_momentum_value_zero_leaves_fp32_buffers_alone_and_zeroes_a_first_steps(kernel_ops_on_cpu, gen):
    """A momentum tensor whose value is 0 is plain SGD: the kernel op does not touch the buffers; on a first
    step the public op writes them as zeros (the value is compared on the device, not read)."""
    first = _sgd_args(gen, first_step=True, momentum=0.0)
    later = _sgd_args(gen, first_step=False, momentum=0.0)
    later_bufs = [b.clone() for b in later[2]]
    expected = [p - 0.1 * (g + 0.01 * p) for p, g in zip(first[0], first[1])]
    OPS.sgd_update_(*first)
    OPS.sgd_update_(*later)
    assert all(torch.equal(b, torch.zeros_like(b)) for b in first[2])
    _assert_same_bits(later[2], later_bufs)
    torch.testing.assert_close(first[0], expected)


@pytest.mark.parametrize("found_inf, counted", [(None, 1.0), (torch.tensor([0.0]), 1.0), (torch.tensor([1.0]), 0.0)],
                         ids=["no-found_inf", "found_inf-0", "found_inf-1"])
def test_step_counters_count_the_steps_that_run(found_inf, counted, kernel_ops_on_cpu, gen):
    steps = [torch.tensor(2.0), torch.tensor([7.0]), torch.tensor(0.0)]
    OPS.sgd8bit_update_(*_sgd8_args(gen), found_inf=found_inf, steps=steps)
    assert [s.item() for s in steps] == [2.0 + counted, 7.0 + counted, counted]
    assert [s.shape for s in steps] == [(), (1,), ()]


def test_step_counters_on_another_device_are_refused_before_the_kernel_runs(kernel_ops_on_cpu, gen):
    """Counters live on the CPU or on the params' device (and where found_inf is, when that is not the CPU:
    a rule that CPU-only tensors always meet)."""
    args = _sgd8_args(gen)
    kernel_ops_on_cpu.calls.clear()
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be a one-element float32 CPU tensor; got Float of 1 "
                                           r"elements on meta"):
        OPS.sgd8bit_update_(*args, steps=[torch.zeros((), device="meta")] * 3)
    assert not kernel_ops_on_cpu.calls


def test_complex_params_reach_the_kernel_ops_as_real_views(kernel_ops_on_cpu, gen):
    params = [torch.randn(s, generator=gen, dtype=torch.complex64) for s in ((5, 3), (300,))]
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    bufs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    args = [params, grads, bufs, torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64),
            0.0, 0.0, True, False, False]
    expected = _clone(args)
    OPS.sgd_update_(*args)
    [(_, received)] = kernel_ops_on_cpu.calls
    for key, originals in (("params", params), ("grads", grads), ("momentum_buffers", bufs)):
        assert len(received[key]) == len(originals)
        for r, o in zip(received[key], originals):
            assert r.dtype == torch.float32 and r.shape == (*o.shape, 2)
            assert r.data_ptr() == o.data_ptr()  # views: the kernel writes the complex tensors
    want = [torch.view_as_complex(_sgd_rule(torch.view_as_real(p), torch.view_as_real(g), torch.view_as_real(b),
                                            lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True,
                                            maximize=False, first_step=False, grad_scale=None)[0])
            for p, g, b in zip(*expected[:3])]
    torch.testing.assert_close(params, want)


@pytest.mark.parametrize("route", ["compiled", "kernel-ops"])
def test_versions_bump_once_and_nothing_warns(route, request, gen):
    """The public op's ADInplaceOrView kernel bumps each written tensor once; what the op calls inside - a
    kernel op, the fills of a skipped first step - runs below autograd: no check, no bump, no warning."""
    if route == "kernel-ops":
        request.getfixturevalue("kernel_ops_on_cpu")
    args = _sgd_args(gen, first_step=True)
    for p in args[0]:
        p.requires_grad_(True)
    versions = [[t._version for t in args[i]] for i in range(3)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        OPS.sgd_update_(*args, found_inf=torch.tensor([1.0]))
    assert [[t._version for t in args[i]] for i in range(3)] == [[v + 1 for v in versions[0]], versions[1],
                                                                 [v + 1 for v in versions[2]]]


@pytest.mark.parametrize("route", ["compiled", "kernel-ops"])
def test_opcheck_on_both_routes(route, request, gen):
    if route == "kernel-ops":
        request.getfixturevalue("kernel_ops_on_cpu")
    amp = dict(grad_scale=torch.tensor(2.0), found_inf=torch.tensor([0.0]))
    for first_step in (False, True):
        torch.library.opcheck(OPS.sgd_update_.default, tuple(_sgd_args(gen, first_step=first_step)), amp)
        torch.library.opcheck(OPS.sgd8bit_update_.default, tuple(_sgd8_args(gen, first_step=first_step)),
                              dict(amp, steps=[torch.zeros(()) for _ in range(3)]))
    for per_row in (False, True):
        torch.library.opcheck(OPS.quantize_blockwise.default, (torch.randn(3, 300, generator=gen), per_row))
    codes, absmax = ops.quantize_blockwise(torch.randn(3, 300, generator=gen), per_row=True)
    torch.library.opcheck(OPS.dequantize_blockwise.default, (codes, absmax, torch.bfloat16))
