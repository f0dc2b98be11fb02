"""Nothing the engine keeps grows without bound: 10,000 traces at 10,000 distinct call sites.

A notebook makes a new "file" for every cell it runs, and a server one per job; the
engine's caches of captured blocks are bounded, and tracing leaves no hook or value behind.
"""

import linecache

import torch

from nnsight import NNsight
from nnsight.tracing import capture, source


def test_ten_thousand_cells_keep_the_caches_bounded(seq):
    model = NNsight(seq)
    x = torch.rand(1, 5)
    expected = seq[0](x)
    for i in range(10_000):
        text = f"with model.trace(x):\n    out_{i} = model[0].output.save()\n"
        name = f"<cell-{i}>"
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
        scope = {"model": model, "x": x}
        try:
            exec(compile(text, name, "exec"), scope)
        finally:
            del linecache.cache[name]
        assert torch.equal(scope[f"out_{i}"], expected)
    assert len(capture.blocks) <= capture.blocks.max_blocks
    assert len(capture.blocks.filenames()) <= capture.blocks.max_blocks
    assert len(source.infos) <= source.infos.limit
    assert "forward" not in seq[0].__dict__
