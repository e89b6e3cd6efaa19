"""Export an optimizer update with torch.export, then compile it ahead of time with AOTInductor.

An optimizer step is just a function of (params, grads, state, lr): wrap the torchsgd8 op in a module,
export it, and the `torchsgd8::` op appears in the graph as it is (its fake kernel gives the shapes). The
program survives run_decompositions(), torch.export.save/load, and AOTInductor packaging; the compiled
package calls the same CPU kernel, so results are bit-identical to eager.

Run:  .venv/bin/python examples/export_step.py [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import warnings

import torch

import torchsgd8
from torchsgd8 import ops


class FP32Step(torch.nn.Module):
    """One SGD step with an fp32 momentum buffer (torch.optim.SGD's rule); returns the updated tensors."""

    def forward(self, param, grad, buf, lr, momentum):
        ops.sgd_update_([param], [grad], [buf], lr, momentum, 0.0, 0.0, False, False, False)
        return param, buf


class EightBitStep(torch.nn.Module):
    """The same step with the buffer stored as 8-bit codes + one absmax per 256 elements."""

    def forward(self, param, grad, codes, absmax, lr, momentum):
        ops.sgd8bit_update_([param], [grad], [codes], [absmax], lr, momentum, 0.0, 0.0, False, False, False)
        return param, codes, absmax


def example_inputs(eight_bit: bool, n: int = 1000):
    g = torch.Generator().manual_seed(0)
    param, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    lr, momentum = torch.tensor(0.05), torch.tensor(0.9)
    if eight_bit:
        codes, absmax = ops.quantize_blockwise(torch.randn(n, generator=g))
        return param, grad, codes, absmax, lr, momentum
    return param, grad, torch.randn(n, generator=g), lr, momentum


def clone_all(inputs):
    return tuple(t.clone() for t in inputs)


def check(name: str, module: torch.nn.Module, eight_bit: bool, out_dir: str) -> None:
    inputs = example_inputs(eight_bit)
    expected = module(*clone_all(inputs))

    exported = torch.export.export(module, clone_all(inputs))
    assert "torchsgd8." in str(exported.graph), "the torchsgd8 op should be in the exported graph"
    exported = exported.run_decompositions()
    path = os.path.join(out_dir, f"{name}.pt2")
    torch.export.save(exported, path)
    reloaded = torch.export.load(path)
    got = reloaded.module()(*clone_all(inputs))
    assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"{name}: exported program differs"

    package = torch._inductor.aoti_compile_and_package(reloaded, package_path=os.path.join(out_dir, f"{name}_aoti.pt2"))
    compiled = torch._inductor.aoti_load_package(package)
    got = compiled(*clone_all(inputs))
    assert all(torch.equal(a, b) for a, b in zip(got, expected)), f"{name}: AOTInductor package differs"
    print(f"{name}: export -> run_decompositions -> save/load -> AOTInductor: identical to eager")
    print(f"  graph after decompositions:\n{exported.graph_module.code.strip()}\n")


def main() -> None:
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch 2.13's own deprecation noise
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for the .pt2 files (default: a temp dir)")
    args = parser.parse_args()
    print(f"torchsgd8 {torchsgd8.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = args.out or tmp
        os.makedirs(out_dir, exist_ok=True)
        check("sgd_fp32_step", FP32Step(), eight_bit=False, out_dir=out_dir)
        check("sgd_8bit_step", EightBitStep(), eight_bit=True, out_dir=out_dir)


if __name__ == "__main__":
    main()
