"""Traces written in IPython / Jupyter cells (the source lives in IPython's cell cache)."""

import pytest
import torch

IPython = pytest.importorskip("IPython")


def test_trace_in_cells():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    shell.user_ns.update(net=net, torch=torch)
    assert shell.run_cell("from nnsight import NNsight\nmodel = NNsight(net)\nx = torch.rand(1, 3)").success
    result = shell.run_cell(
        "with model.trace(x):\n    hidden = model[0].output.save()\n    unsaved = 1\n"
        "def helper():\n    with model.trace(x):\n        out = model.output.save()\n    return out\n"
        "out = helper()\n"
    )
    assert result.success, result.error_in_exec
    ns = shell.user_ns
    assert torch.equal(ns["hidden"], net[0](ns["x"])) and torch.equal(ns["out"], net(ns["x"]))
    assert "unsaved" not in ns
