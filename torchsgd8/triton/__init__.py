"""Triton GPU kernels of the torchsgd8 update and quantization ops.

- ``kernels``: the ``@triton.jit`` kernels. The SGD rule of csrc/sgd_rule.h is written once (``sgd_rule``)
  and shared by the full-precision and the 8-bit update kernel; the codebook, the exact nearest-code rule
  and the block layouts are those of csrc/quant.h. Every ``a + s * b`` is one fused multiply-add, divisions
  are IEEE-rounded and bf16 stores round to nearest even, so results are bit-identical to the C++ CPU
  kernels (NaN payloads aside).
- ``launch``: the launchers the CUDA (and XPU) implementations of the kernel ops call — ``sgd_update``,
  ``sgd8bit_update``, ``quantize_blockwise``, ``dequantize_blockwise`` — with the multi-tensor tables (one
  launch per op call whatever the number of tensors), their cache, and the codebook tables per device.

Importing this package does not import triton (``import torchsgd8`` never does); importing
``torchsgd8.triton.kernels`` or ``.launch`` does. Under ``TRITON_INTERPRET=1`` (set before triton is
imported) the kernels run on CPU tensors in Triton's interpreter, which is how tests/test_triton.py checks
them against the CPU kernels on a machine without a GPU.
"""
from __future__ import annotations

import torch

__all__ = ["KERNEL_OPS", "register_kernels"]

# The kernel ops (csrc/ops.cpp) and the launcher in launch.py that implements each.
KERNEL_OPS = {
    "_sgd_update_kernel_": "sgd_update",
    "_sgd8bit_update_kernel_": "sgd8bit_update",
    "_quantize_blockwise_kernel_": "quantize_blockwise",
    "_dequantize_blockwise_kernel_": "dequantize_blockwise",
}


def register_kernels(library: torch.library.Library, dispatch_key: str) -> None:
    """Registers the Triton launchers as ``dispatch_key``'s kernels of the kernel ops, in ``library`` (a
    ``torch.library.Library("torchsgd8", "IMPL")``). triton is imported on the first call, not here.

    torchsgd8 registers them for CUDA (ROCm builds of torch use that key too) and XPU at import; tests
    register them for CPU, which sends CPU tensors through the Triton kernels in Triton's interpreter.
    """
    for op, launcher in KERNEL_OPS.items():
        library.impl(op, _lazy_launcher(launcher), dispatch_key)


def _lazy_launcher(name: str):
    def kernel(*args):
        try:
            from . import launch
        except ImportError as error:  # no triton (or one this torch cannot use)
            raise RuntimeError(
                f"torchsgd8: the GPU kernels are Triton kernels and triton cannot be imported ({error}); "
                "install the triton that matches this torch"
            ) from error
        getattr(launch, name)(*args)

    kernel.__name__ = kernel.__qualname__ = f"triton_{name}"
    return kernel
