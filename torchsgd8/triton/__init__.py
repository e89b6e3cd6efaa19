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
