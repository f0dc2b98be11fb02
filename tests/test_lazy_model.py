"""A lazily loaded model (weights on meta until the first trace): scan, then trace, generate, edit.

Anything an envoy keeps about its module must follow the module when the meta modules
are replaced by the loaded ones. Every value is checked against a plain hook on the
loaded model.
"""

import pytest
import torch

from nnsight import LanguageModel


@pytest.fixture
def folder(tmp_path, gpt2, gpt2_tokenizer):
    gpt2.save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    return tmp_path


def _hooked(module, run):
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_scan_then_trace_generate_edit(folder, gpt2_tokenizer):
    model = LanguageModel(str(folder))
    with model.scan("Hello world"):
        dim = model.transformer.h[0].mlp.output.shape[-1]
        dims = [dim].save()
    assert dims == [32]
    with model.trace("Hello world"):
        hs = model.transformer.h[0].mlp.output.save()
        logits = model.lm_head.output.save()
    real = model._module
    ids = gpt2_tokenizer("Hello world", return_tensors="pt")
    seen = _hooked(real.transformer.h[0].mlp, lambda: real(**ids))
    assert torch.allclose(hs, seen[0], atol=1e-6)
    assert torch.allclose(logits, real(**ids).logits, atol=1e-5)

    with model.generate("Hello world", max_new_tokens=2) as tracer:
        steps = list().save()
        for step in tracer.iter[:]:
            steps.append(model.lm_head.output)
    assert len(steps) == 2

    with model.edit() as edited:
        edited.transformer.h[0].mlp.output[:] = 0
    with edited.trace("Hello world"):
        zeroed = edited.transformer.h[0].mlp.output.save()
    assert zeroed.abs().sum() == 0


def test_root_source_is_the_forward_listing_not_the_weights_path(folder):
    model = LanguageModel(str(folder))
    listing = str(model.source)
    assert "self_transformer_0" in listing and str(folder) not in listing
