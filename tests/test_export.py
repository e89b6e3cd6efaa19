"""torch.export and AOTInductor with the torchsgd8 update ops.

A small module whose forward(params..., grads..., state..., lr) makes one fused update call is exported:
the op stays in the graph (and, after ``run_decompositions()``, inside ``auto_functionalized_v2``), the
program survives ``torch.export.save``/``load``, and running it -- as an ExportedProgram or compiled by
AOTInductor -- updates the inputs in place exactly as the eager op call does. forward also returns clones
of the updated tensors, so the results can be checked both ways.

The expected graph texts were produced with EXPECTTEST_ACCEPT=1 and reviewed.
"""
from __future__ import annotations

import operator

import expecttest
import pytest
import torch

from torchsgd8 import ops

SGD_OP = torch.ops.torchsgd8.sgd_update_.default
SGD8BIT_OP = torch.ops.torchsgd8.sgd8bit_update_.default


class SGDStep(torch.nn.Module):
    """Nesterov momentum with weight decay on two params; momentum is a (float64) module buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("momentum", torch.tensor(0.9, dtype=torch.float64))

    def forward(self, p0, p1, g0, g1, buf0, buf1, lr):
        ops.sgd_update_([p0, p1], [g0, g1], [buf0, buf1], lr, self.momentum, 0.0, 0.01, True, False, False)
        return p0.clone(), p1.clone(), buf0.clone(), buf1.clone()


class SGD8bitStep(torch.nn.Module):
    """8-bit momentum with dampening on two params (3 and 2 absmax blocks)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("momentum", torch.tensor(0.9, dtype=torch.float64))

    def forward(self, p0, p1, g0, g1, codes0, codes1, absmax0, absmax1, lr):
        ops.sgd8bit_update_([p0, p1], [g0, g1], [codes0, codes1], [absmax0, absmax1], lr, self.momentum,
                            0.1, 0.0, False, False, False)
        return p0.clone(), p1.clone(), codes0.clone(), codes1.clone(), absmax0.clone(), absmax1.clone()


class BothSteps(torch.nn.Module):
    """One fp32-state bucket and one 8-bit bucket, as an optimizer step with mixed state makes."""

    def __init__(self):
        super().__init__()
        self.fp32 = SGDStep()
        self.int8 = SGD8bitStep()

    def forward(self, fp32_inputs, int8_inputs):
        return self.fp32(*fp32_inputs), self.int8(*int8_inputs)


def sgd_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (5,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    bufs = [torch.randn(s, generator=g) for s in shapes]
    return (*params, *grads, *bufs, torch.tensor(0.1))


def sgd8bit_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    shapes = [(600,), (20, 13)]  # 600 = 2 full blocks + a partial one; 260 = 1 full + 4 elements
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    codes, absmax = zip(*(ops.quantize_blockwise(torch.randn(s, generator=g)) for s in shapes))
    return (*params, *grads, *codes, *absmax, torch.tensor(0.05))


CASES = {
    "fp32": (SGDStep, sgd_inputs, SGD_OP),
    "8bit": (SGD8bitStep, sgd8bit_inputs, SGD8BIT_OP),
}
# inputs updated in place: params and state (grads and lr are read-only)
MUTATED = {"fp32": (0, 1, 4, 5), "8bit": (0, 1, 4, 5, 6, 7)}


def clone_all(inputs):
    return tuple(x.clone() for x in inputs)


def export(kind):
    module_cls, make_inputs, _ = CASES[kind]
    return torch.export.export(module_cls(), clone_all(make_inputs()))


def eager_result(kind):
    """Inputs after the eager module ran on them, and its outputs."""
    module_cls, make_inputs, _ = CASES[kind]
    inputs = clone_all(make_inputs())
    outputs = module_cls()(*inputs)
    return inputs, outputs


def op_targets(ep: torch.export.ExportedProgram) -> list:
    """Targets of the graph's call_function nodes, with the op wrapped by auto_functionalized_v2 unpacked."""
    targets = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        targets.append(node.target)
        if node.target is torch.ops.higher_order.auto_functionalized_v2:
            targets.append(node.args[0])
    return targets


def assert_runs_like_eager(kind, run):
    """run(inputs) -> outputs; checks outputs and in-place updates against the eager module, bitwise."""
    expected_inputs, expected_outputs = eager_result(kind)
    _, make_inputs, _ = CASES[kind]
    original = make_inputs()
    inputs = clone_all(original)
    outputs = run(inputs)
    assert len(outputs) == len(expected_outputs)
    for i, (out, want) in enumerate(zip(outputs, expected_outputs)):
        assert torch.equal(out, want), f"output {i}"
    for i, (got, want, before) in enumerate(zip(inputs, expected_inputs, original)):
        assert torch.equal(got, want), f"input {i} after the run"
        # the update is real: params and state changed, grads and lr did not
        assert torch.equal(got, before) == (i not in MUTATED[kind]), f"input {i} changed: {i in MUTATED[kind]}"


# ---- graph texts --------------------------------------------------------------------------------------


class TestExportedGraphs(expecttest.TestCase):
    def test_sgd_update_graph(self):
        ep = export("fp32")
        self.assertExpectedInline(ep.graph_module.code.strip(), """\
def forward(self, b_momentum, p0, p1, g0, g1, buf0, buf1, lr):
    sgd_update_ = torch.ops.torchsgd8.sgd_update_.default([p0, p1], [g0, g1], [buf0, buf1], lr, b_momentum, 0.0, 0.01, True, False, False);  g0 = g1 = lr = b_momentum = sgd_update_ = None
    clone = torch.ops.aten.clone.default(p0);  p0 = None
    clone_1 = torch.ops.aten.clone.default(p1);  p1 = None
    clone_2 = torch.ops.aten.clone.default(buf0);  buf0 = None
    clone_3 = torch.ops.aten.clone.default(buf1);  buf1 = None
    return (clone, clone_1, clone_2, clone_3)""")
        self.assertExpectedInline(str(ep.graph_signature).strip(), """\
# inputs
b_momentum: BUFFER target='momentum' persistent=True
p0: USER_INPUT
p1: USER_INPUT
g0: USER_INPUT
g1: USER_INPUT
buf0: USER_INPUT
buf1: USER_INPUT
lr: USER_INPUT

# outputs
clone: USER_OUTPUT
clone_1: USER_OUTPUT
clone_2: USER_OUTPUT
clone_3: USER_OUTPUT""")

    def test_sgd_update_graph_after_run_decompositions(self):
        ep = export("fp32").run_decompositions()
        self.assertExpectedInline(ep.graph_module.code.strip(), """\
def forward(self, b_momentum, p0, p1, g0, g1, buf0, buf1, lr):
    auto_functionalized_v2 = torch.ops.higher_order.auto_functionalized_v2(torch.ops.torchsgd8.sgd_update_.default, grads = [g0, g1], lr = lr, momentum = b_momentum, dampening = 0.0, weight_decay = 0.01, nesterov = True, maximize = False, first_step = False, grad_scale = None, found_inf = None, rounding_seed = None, _params_length = 2, _params_0_base_index = 0, _params_1_base_index = 1, _momentum_buffers_length = 2, _momentum_buffers_0_base_index = 2, _momentum_buffers_1_base_index = 3, _all_bases = [p0, p1, buf0, buf1]);  g0 = g1 = lr = b_momentum = p0 = p1 = buf0 = buf1 = None
    getitem_1 = auto_functionalized_v2[1]
    getitem_2 = auto_functionalized_v2[2]
    getitem_3 = auto_functionalized_v2[3]
    getitem_4 = auto_functionalized_v2[4];  auto_functionalized_v2 = None
    clone = torch.ops.aten.clone.default(getitem_1)
    clone_1 = torch.ops.aten.clone.default(getitem_2)
    clone_2 = torch.ops.aten.clone.default(getitem_3)
    clone_3 = torch.ops.aten.clone.default(getitem_4)
    return (getitem_1, getitem_2, getitem_3, getitem_4, clone, clone_1, clone_2, clone_3)""")
        self.assertExpectedInline(str(ep.graph_signature).strip(), """\
# inputs
b_momentum: BUFFER target='momentum' persistent=True
p0: USER_INPUT
p1: USER_INPUT
g0: USER_INPUT
g1: USER_INPUT
buf0: USER_INPUT
buf1: USER_INPUT
lr: USER_INPUT

# outputs
getitem_1: USER_INPUT_MUTATION target='p0'
getitem_2: USER_INPUT_MUTATION target='p1'
getitem_3: USER_INPUT_MUTATION target='buf0'
getitem_4: USER_INPUT_MUTATION target='buf1'
clone: USER_OUTPUT
clone_1: USER_OUTPUT
clone_2: USER_OUTPUT
clone_3: USER_OUTPUT""")

    def test_sgd8bit_update_graph(self):
        ep = export("8bit")
        self.assertExpectedInline(ep.graph_module.code.strip(), """\
def forward(self, b_momentum, p0, p1, g0, g1, codes0, codes1, absmax0, absmax1, lr):
    sgd8bit_update_ = torch.ops.torchsgd8.sgd8bit_update_.default([p0, p1], [g0, g1], [codes0, codes1], [absmax0, absmax1], lr, b_momentum, 0.1, 0.0, False, False, False);  g0 = g1 = lr = b_momentum = sgd8bit_update_ = None
    clone = torch.ops.aten.clone.default(p0);  p0 = None
    clone_1 = torch.ops.aten.clone.default(p1);  p1 = None
    clone_2 = torch.ops.aten.clone.default(codes0);  codes0 = None
    clone_3 = torch.ops.aten.clone.default(codes1);  codes1 = None
    clone_4 = torch.ops.aten.clone.default(absmax0);  absmax0 = None
    clone_5 = torch.ops.aten.clone.default(absmax1);  absmax1 = None
    return (clone, clone_1, clone_2, clone_3, clone_4, clone_5)""")

    def test_sgd8bit_update_graph_after_run_decompositions(self):
        ep = export("8bit").run_decompositions()
        self.assertExpectedInline(ep.graph_module.code.strip(), """\
def forward(self, b_momentum, p0, p1, g0, g1, codes0, codes1, absmax0, absmax1, lr):
    auto_functionalized_v2 = torch.ops.higher_order.auto_functionalized_v2(torch.ops.torchsgd8.sgd8bit_update_.default, grads = [g0, g1], lr = lr, momentum = b_momentum, dampening = 0.1, weight_decay = 0.0, nesterov = False, maximize = False, first_step = False, grad_scale = None, found_inf = None, rounding_seed = None, _params_length = 2, _params_0_base_index = 0, _params_1_base_index = 1, _codes_length = 2, _codes_0_base_index = 2, _codes_1_base_index = 3, _absmax_length = 2, _absmax_0_base_index = 4, _absmax_1_base_index = 5, _steps_length = None, _all_bases = [p0, p1, codes0, codes1, absmax0, absmax1]);  g0 = g1 = lr = b_momentum = p0 = p1 = codes0 = codes1 = absmax0 = absmax1 = None
    getitem_1 = auto_functionalized_v2[1]
    getitem_2 = auto_functionalized_v2[2]
    getitem_3 = auto_functionalized_v2[3]
    getitem_4 = auto_functionalized_v2[4]
    getitem_5 = auto_functionalized_v2[5]
    getitem_6 = auto_functionalized_v2[6];  auto_functionalized_v2 = None
    clone = torch.ops.aten.clone.default(getitem_1)
    clone_1 = torch.ops.aten.clone.default(getitem_2)
    clone_2 = torch.ops.aten.clone.default(getitem_3)
    clone_3 = torch.ops.aten.clone.default(getitem_4)
    clone_4 = torch.ops.aten.clone.default(getitem_5)
    clone_5 = torch.ops.aten.clone.default(getitem_6)
    return (getitem_1, getitem_2, getitem_3, getitem_4, getitem_5, getitem_6, clone, clone_1, clone_2, clone_3, clone_4, clone_5)""")
        self.assertExpectedInline(str(ep.graph_signature).strip(), """\
# inputs
b_momentum: BUFFER target='momentum' persistent=True
p0: USER_INPUT
p1: USER_INPUT
g0: USER_INPUT
g1: USER_INPUT
codes0: USER_INPUT
codes1: USER_INPUT
absmax0: USER_INPUT
absmax1: USER_INPUT
lr: USER_INPUT

# outputs
getitem_1: USER_INPUT_MUTATION target='p0'
getitem_2: USER_INPUT_MUTATION target='p1'
getitem_3: USER_INPUT_MUTATION target='codes0'
getitem_4: USER_INPUT_MUTATION target='codes1'
getitem_5: USER_INPUT_MUTATION target='absmax0'
getitem_6: USER_INPUT_MUTATION target='absmax1'
clone: USER_OUTPUT
clone_1: USER_OUTPUT
clone_2: USER_OUTPUT
clone_3: USER_OUTPUT
clone_4: USER_OUTPUT
clone_5: USER_OUTPUT""")


# ---- behaviour ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CASES)
def test_exported_graph_contains_the_op(kind):
    op = CASES[kind][2]
    ep = export(kind)
    assert op in op_targets(ep)
    decomposed = ep.run_decompositions()
    targets = op_targets(decomposed)
    assert torch.ops.higher_order.auto_functionalized_v2 in targets
    assert op in targets  # functionalized, not decomposed away


@pytest.mark.parametrize("kind", CASES)
def test_strict_export_contains_the_op(kind):
    module_cls, make_inputs, op = CASES[kind]
    ep = torch.export.export(module_cls(), clone_all(make_inputs()), strict=True)
    assert op in op_targets(ep)
    assert_runs_like_eager(kind, lambda inputs: ep.module()(*inputs))


@pytest.mark.parametrize("decompose", [False, True], ids=["exported", "decomposed"])
@pytest.mark.parametrize("kind", CASES)
def test_exported_program_runs_like_eager(kind, decompose):
    ep = export(kind)
    if decompose:
        ep = ep.run_decompositions()
    assert_runs_like_eager(kind, lambda inputs: ep.module()(*inputs))


@pytest.mark.parametrize("decompose", [False, True], ids=["exported", "decomposed"])
@pytest.mark.parametrize("kind", CASES)
def test_save_load_roundtrip(kind, decompose, tmp_path):
    ep = export(kind)
    if decompose:
        ep = ep.run_decompositions()
    path = tmp_path / f"{kind}.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    if not decompose:
        assert loaded.graph_module.code == ep.graph_module.code
    # (deserialising the decomposed program adds a getitem for auto_functionalized_v2's None output)
    assert str(loaded.graph_signature) == str(ep.graph_signature)
    non_getitem = [t for t in op_targets(loaded) if t is not operator.getitem]
    assert non_getitem == [t for t in op_targets(ep) if t is not operator.getitem]
    assert CASES[kind][2] in op_targets(loaded)
    assert_runs_like_eager(kind, lambda inputs: loaded.module()(*inputs))


def test_aot_inductor_runs_both_ops(tmp_path):
    """AOTInductor compiles a program calling both ops into a package; loaded back, it updates its inputs
    in place and returns the same results as eager (bitwise: the same CPU kernels run)."""
    fp32_inputs, int8_inputs = sgd_inputs(), sgd8bit_inputs()
    ep = torch.export.export(BothSteps(), (clone_all(fp32_inputs), clone_all(int8_inputs)))
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "both_steps.pt2"))
    runner = torch._inductor.aoti_load_package(package)

    expected_fp32, expected_int8 = clone_all(fp32_inputs), clone_all(int8_inputs)
    expected_outputs = BothSteps()(expected_fp32, expected_int8)
    got_fp32, got_int8 = clone_all(fp32_inputs), clone_all(int8_inputs)
    outputs = runner(got_fp32, got_int8)

    # the package returns forward's nested structure
    assert len(outputs) == len(expected_outputs) == 2
    flat_expected = [t for group in expected_outputs for t in group]
    flat_outputs = [t for group in outputs for t in group]
    assert len(flat_outputs) == len(flat_expected) == 10
    for i, (out, want) in enumerate(zip(flat_outputs, flat_expected)):
        assert torch.equal(out, want), f"output {i}"
    for kind, got, want, before in [("fp32", got_fp32, expected_fp32, fp32_inputs),
                                    ("8bit", got_int8, expected_int8, int8_inputs)]:
        for i, (g, w, b) in enumerate(zip(got, want, before)):
            assert torch.equal(g, w), f"{kind} input {i} after the run"
            assert torch.equal(g, b) == (i not in MUTATED[kind]), f"{kind} input {i}"
