"""LanguageModel: inputs, padding that never changes results, lazy loading."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nnsight import LanguageModel  # noqa: E402


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(params=["gpt2", "llama"])
def family(request, gpt2, gpt2_tokenizer):
    model = gpt2 if request.param == "gpt2" else _llama()
    return model, gpt2_tokenizer


def _alone(hf, tok, text):
    return hf(**tok(text, return_tensors="pt")).logits


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_changes_logits(family, side):
    hf, tok = family
    side_before = tok.padding_side
    model = LanguageModel(hf, tokenizer=tok, padding_side=side)
    long, short = "The Eiffel Tower is in the city of", "Hello"
    with model.trace() as tracer:
        with tracer.invoke(long):
            a = model.output.logits.save()
        with tracer.invoke(short):
            b = model.output.logits.save()
    n = len(tok(short).input_ids)
    got_b = b[:, -n:] if side == "left" else b[:, :n]
    assert torch.allclose(a, _alone(hf, tok, long), atol=1e-5)
    assert torch.allclose(got_b, _alone(hf, tok, short), atol=1e-5)
    assert tok.padding_side == side_before  # the caller's tokenizer is untouched


def test_input_forms_agree(gpt2, gpt2_tokenizer):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    text = "Hello world"
    ids = gpt2_tokenizer(text).input_ids
    forms = [text, [text], ids, torch.tensor([ids]), gpt2_tokenizer(text, return_tensors="pt")]
    results = []
    for form in forms:
        with model.trace(form):
            out = model.lm_head.output.save()
        results.append(out)
    with model.trace(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)):
        out = model.lm_head.output.save()
    results.append(out)
    for r in results[1:]:
        assert torch.allclose(r, results[0])


def test_batch_of_strings_in_one_invoke(gpt2, gpt2_tokenizer):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    with model.trace(["Hello", "The Eiffel Tower"]):
        logits = model.lm_head.output.save()
    assert logits.shape[0] == 2
    assert torch.allclose(logits[1:, :], _alone(gpt2, gpt2_tokenizer, "The Eiffel Tower"), atol=1e-5)


def test_prompt_less_invoke_sees_all_rows(gpt2, gpt2_tokenizer):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    with model.trace() as tracer:
        with tracer.invoke("Hello"):
            out1 = model.lm_head.output[:, -1].save()
        with tracer.invoke(["World", "Test"]):
            out2 = model.lm_head.output[:, -1].save()
        with tracer.invoke():
            out_all = model.lm_head.output[:, -1].save()
    assert out1.shape == (1, 50257) and out2.shape == (2, 50257) and out_all.shape == (3, 50257)
    assert torch.equal(out_all[0], out1[0]) and torch.equal(out_all[1:], out2)


def test_logit_lens_ad_hoc_modules(gpt2, gpt2_tokenizer, block_hidden):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    with model.trace("The Eiffel Tower is in the city of"):
        hidden_states = block_hidden(model.transformer.h[-1].output)
        logits = model.lm_head(model.transformer.ln_f(hidden_states))
        tokens = logits.argmax(dim=-1).save()
        final = model.lm_head.output.argmax(dim=-1).save()
    assert torch.equal(tokens, final)


def test_lazy_loading_from_folder(tmp_path, gpt2, gpt2_tokenizer):
    gpt2.save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    model = LanguageModel(str(tmp_path))
    assert next(model._module.parameters()).device.type == "meta"
    layer = model.transformer.h[0]
    assert "GPT2Block" in repr(layer)
    with model.trace("Hello"):
        out = layer.output[0].save()
        logits = model.lm_head.output.save()
    assert out.device.type == "cpu"
    assert torch.allclose(logits, _alone(gpt2, gpt2_tokenizer, "Hello"), atol=1e-5)
