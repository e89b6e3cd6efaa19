"""The compiled library keeps each instruction set's code to its own kernels.

The CPU kernels are compiled three times (DEFAULT, AVX2, AVX512) and chosen at run time, so a CPU without
AVX-512 must never execute a 512-bit instruction. Inline functions that several copies share (std::, c10::)
are emitted once per copy and the linker keeps one of them; CMakeLists.txt links the portable objects
first so that the kept one is portable. This test disassembles the built library and checks that every
function using ymm registers belongs to the AVX2 or AVX512 kernels, and every one using zmm or mask
registers to the AVX512 kernels (or is a local clone called only from there). It reads the unstripped
library in the build directory (the installed copy has no local symbols) and skips where there is none.
"""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

FUNCTION = re.compile(r"^([0-9a-f]+) <(.*)>:$")
CALL = re.compile(r"\scall\s+([0-9a-f]+) <")
ZMM = re.compile(r"%zmm|%k[1-7]\b")
YMM = re.compile(r"%ymm")


def _disassembly():
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the ISA-specific kernels are built on x86-64 only")
    if shutil.which("objdump") is None:
        pytest.skip("objdump is not installed")
    built = sorted(Path(__file__).resolve().parent.parent.glob("build/*/_C*.so"), key=lambda p: p.stat().st_mtime)
    if not built:
        pytest.skip("no build directory with the unstripped library")
    proc = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", str(built[-1])], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def test_wide_instructions_stay_in_their_kernels():
    names = {}  # address -> function
    uses = defaultdict(set)  # function address -> {"ymm", "zmm"}
    callers = defaultdict(set)  # callee address -> caller addresses
    current = None
    for line in _disassembly():
        match = FUNCTION.match(line)
        if match:
            current = int(match.group(1), 16)
            names[current] = match.group(2)
            continue
        if current is None:
            continue
        if ZMM.search(line):
            uses[current].add("zmm")
        elif YMM.search(line):
            uses[current].add("ymm")
        call = CALL.search(line)
        if call:
            callers[int(call.group(1), 16)].add(current)

    def allowed(address, namespaces):
        name = names[address]
        if any(f"::{ns}::" in name for ns in namespaces):
            return True
        # a compiler-made local copy (".constprop", ".isra", ...) is fine where only those kernels call it
        return "[clone" in name and bool(callers[address]) and all(
            any(f"::{ns}::" in names[c] for ns in namespaces) for c in callers[address])

    assert any("::AVX2::" in n for n in names.values()), "no AVX2 kernels in this build"
    wrong = [names[a] for a, kinds in uses.items()
             if ("zmm" in kinds and not allowed(a, ["AVX512"]))
             or ("ymm" in kinds and not allowed(a, ["AVX2", "AVX512"]))]
    assert not wrong, f"wide instructions outside their kernels: {wrong[:5]}"
