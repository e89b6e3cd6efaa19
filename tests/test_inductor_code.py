"""The code Inductor generates for a whole compiled training step calls our ops in place on the
optimizer's own tensors: no clone or copy of parameter- or state-sized buffers around them."""
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

import torchsgd8

from helpers import training_step


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_whole_step_calls_ops_in_place_without_copies(optim_bits):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 300), torch.nn.ReLU(), torch.nn.Linear(300, 10))
    params = list(model.parameters())
    opt = torchsgd8.SGD(params, lr=torch.tensor(0.05), momentum=0.9, optim_bits=optim_bits, min_8bit_size=1000)
    step = torch.compile(training_step(model, opt, torch.nn.functional.cross_entropy), fullgraph=True)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    step(x, y)  # warm-up: the first step creates the optimizer state
    before = [p.detach().clone() for p in params]
    _, sources = run_and_get_code(step, x, y)
    code = sources[-1]

    # the steady-state graph updates the params (graph inputs) in place
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    if optim_bits == 8:  # the two big weights have 8-bit state, the biases fp32 buffers
        FileCheck().check("torch.ops.torchsgd8.sgd_update_.default(").check_count(
            "torch.ops.torchsgd8.sgd8bit_update_.default(", 1, exactly=True).run(code)
    else:
        FileCheck().check_count("torch.ops.torchsgd8.sgd_update_.default(", 1, exactly=True).run(code)
    # no copies of params or state: no clone/copy kernels, and every op call's first list (the params)
    # consists of graph inputs, not temporaries
    FileCheck().check_not("aten.clone").check_not(".copy_(").run(code)
    for call in re.findall(r"torch\.ops\.torchsgd8\.\w+\.default\(\[([^\]]*)\]", code):
        assert all(name.strip().startswith("arg") for name in call.split(",")), call
