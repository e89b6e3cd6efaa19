"""`python -m torchsgd8`: versions, registered ops, and the kernels compiled into this build."""
from __future__ import annotations

import platform

import torch

import torchsgd8
from torchsgd8 import _C


def main() -> None:
    ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("torchsgd8::"))
    print(f"torchsgd8 {torchsgd8.__version__}")
    print(f"torch     {torch.__version__} (running); built against torch {_C.built_against_torch()}")
    print(f"python    {platform.python_version()} on {platform.machine()}")
    print(f"ops       {', '.join(ops)}")
    print(f"kernels   CPU: {_C.cpu_isa()} ({torch.get_num_threads()} threads, prefetch "
          f"{'on' if _C.cpu_prefetch() else 'off'}, AVX2 gathers {'on' if _C.cpu_gather() else 'off'})")


if __name__ == "__main__":
    main()
