"""`python -m torchsgd8`: versions, registered ops, and the kernels this build runs on each device."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

import torchsgd8
from torchsgd8 import _C, _torch_private

# Distributions that install the `triton` module: upstream, and the builds torch's ROCm and XPU wheels use.
_TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton-rocm", "pytorch-triton-xpu", "pytorch-triton")


def _triton_version() -> str | None:
    """triton's version if it is installed (without importing it: that takes seconds), else None."""
    if importlib.util.find_spec("triton") is None:
        return None
    for distribution in _TRITON_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown version"


def gpu_kernels_line() -> str:
    """Whether the GPU kernels (Triton, behind the same ops) can run here, and on what."""
    backends = (("cuda", torch.cuda), ("xpu", getattr(torch, "xpu", None)))
    devices = [f"{kind}:{i} {module.get_device_name(i)}" for kind, module in backends
               if module is not None and module.is_available() for i in range(module.device_count())]
    triton = _triton_version()
    if not devices:
        found = f"triton {triton} installed" if triton else "triton not installed"
        return f"GPU: none found (no CUDA/ROCm/XPU device; {found})"
    if triton is None:
        return f"GPU: {', '.join(devices)}; not usable: the GPU kernels are Triton kernels, and triton is not installed"
    return f"GPU: Triton kernels (triton {triton}) on {', '.join(devices)}"


def main() -> None:
    print(f"torchsgd8 {torchsgd8.__version__}")
    print(f"torch     {torch.__version__} (running); built against torch {_C.built_against_torch()}")
    print(f"python    {platform.python_version()} on {platform.machine()}")
    print(f"ops       {', '.join(_torch_private.registered_op_names('torchsgd8'))}")
    print(f"kernels   CPU: {_C.cpu_isa()} ({torch.get_num_threads()} threads, prefetch "
          f"{'on' if _C.cpu_prefetch() else 'off'}, AVX2 gathers {'on' if _C.cpu_gather() else 'off'})")
    print(f"          {gpu_kernels_line()}")


if __name__ == "__main__":
    main()
