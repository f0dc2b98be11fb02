"""Padding follows the tokenizer: its ``padding_side`` decides unless ``LanguageModel(padding_side=...)`` is given.

Oracle: each prompt run alone through the plain Hugging Face model. A row padded on the
wrong side, or with wrong position ids, gives different logits at its last real token.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nnsight import LanguageModel, NNsightError  # noqa: E402

LONG, SHORT = "The Eiffel Tower is in the city of", "Hello there"


def _llama(**extra):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **extra,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(params=["gpt2", "llama"])
def hf(request, gpt2):
    return gpt2 if request.param == "gpt2" else _llama()


def _alone(hf, tok, text):
    with torch.no_grad():
        return hf(**tok(text, return_tensors="pt")).logits[0, -1]


def _two_invokes(model):
    with model.trace() as tracer:
        with tracer.invoke(LONG):
            a = model.output.logits.save()
        with tracer.invoke(SHORT):
            mask = model.inputs[1]["attention_mask"].save()
            b = model.output.logits.save()
    return a, b, mask


def _check(hf, tok, side, a, b, mask):
    n = len(tok(SHORT).input_ids)
    width = len(tok(LONG).input_ids)
    expected_mask = [0] * (width - n) + [1] * n if side == "left" else [1] * n + [0] * (width - n)
    assert mask.tolist() == [expected_mask]
    last = -1 if side == "left" else n - 1  # the short row's last real token
    assert torch.allclose(a[0, -1], _alone(hf, tok, LONG), atol=1e-5)
    assert torch.allclose(b[0, last], _alone(hf, tok, SHORT), atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_tokenizers_padding_side_decides(hf, fresh_gpt2_tokenizer, side):
    tok = fresh_gpt2_tokenizer
    tok.padding_side = side
    model = LanguageModel(hf, tokenizer=tok)
    assert model.padding_side == side
    _check(hf, tok, side, *_two_invokes(model))
    assert tok.padding_side == side and tok.pad_token is None  # the caller's tokenizer is left as it was


def test_setting_it_on_the_tokenizer_later_applies_to_the_next_trace(gpt2, fresh_gpt2_tokenizer):
    tok = fresh_gpt2_tokenizer
    model = LanguageModel(gpt2, tokenizer=tok)
    model.tokenizer.padding_side = "left"
    _check(gpt2, tok, "left", *_two_invokes(model))
    model.tokenizer.padding_side = "right"
    _check(gpt2, tok, "right", *_two_invokes(model))


def test_a_tokenizer_it_loads_itself_starts_on_the_left(tmp_path, gpt2, fresh_gpt2_tokenizer):
    gpt2.save_pretrained(tmp_path)
    fresh_gpt2_tokenizer.save_pretrained(tmp_path)
    model = LanguageModel(str(tmp_path))
    assert model.tokenizer.padding_side == "left" == model.padding_side
    assert model.tokenizer.pad_token == model.tokenizer.eos_token  # so pad_token_id tells the truth
    _check(gpt2, fresh_gpt2_tokenizer, "left", *_two_invokes(model))
    model.tokenizer.padding_side = "right"
    _check(gpt2, fresh_gpt2_tokenizer, "right", *_two_invokes(model))
    assert LanguageModel(str(tmp_path), padding_side="right").tokenizer.padding_side == "right"


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_option_wins_over_the_tokenizer_without_changing_it(hf, fresh_gpt2_tokenizer, side):
    tok = fresh_gpt2_tokenizer
    tok.padding_side = "left" if side == "right" else "right"
    before = tok.padding_side
    model = LanguageModel(hf, tokenizer=tok, padding_side=side)
    _check(hf, tok, side, *_two_invokes(model))
    assert tok.padding_side == before


def test_a_bad_side_is_named():
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', not 'middle'"):
        LanguageModel(_llama(), padding_side="middle")


def test_no_pad_token_anywhere_is_a_clear_error_only_when_padding_is_needed():
    hf = _llama(pad_token_id=None, eos_token_id=None, bos_token_id=None)
    model = LanguageModel(hf)  # no tokenizer: token ids only
    with model.trace([5, 6, 7]):
        alone = model.lm_head.output.save()  # one row: nothing to pad
    assert torch.allclose(alone, hf(torch.tensor([[5, 6, 7]])).logits, atol=1e-6)
    with pytest.raises(ValueError, match="must be padded.*without a pad token.*pad_token"):
        with model.trace() as tracer:
            with tracer.invoke([5, 6, 7]):
                pass
            with tracer.invoke([8]):
                pass


def test_invokes_must_agree_on_keyword_arguments(gpt2, gpt2_tokenizer):
    model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer)
    with model.trace() as tracer:
        with tracer.invoke("Hello", output_hidden_states=True):
            first = model.output.save()
        with tracer.invoke("World", output_hidden_states=True):
            pass
    assert first.hidden_states is not None and len(first.hidden_states) == 3
    with pytest.raises(NNsightError, match=r"invoke 2 passes output_hidden_states=False but invoke 1 passes output_hidden_states=True"):
        with model.trace() as tracer:
            with tracer.invoke("Hello", output_hidden_states=True):
                pass
            with tracer.invoke("World", output_hidden_states=False):
                pass
    with pytest.raises(NNsightError, match=r"invoke 2 passes keyword arguments \[\] but invoke 1 passes \['output_hidden_states'\]"):
        with model.trace() as tracer:
            with tracer.invoke("Hello", output_hidden_states=True):
                pass
            with tracer.invoke("World"):
                pass


@torch.no_grad()
def test_only_the_tokenizers_pad_or_eos_token_pads(gpt2, fresh_gpt2_tokenizer):
    tok = fresh_gpt2_tokenizer
    tok.padding_side = "left"
    model = LanguageModel(gpt2, tokenizer=tok)

    def padded_ids():
        with model.trace() as tracer:
            with tracer.invoke(LONG):
                pass
            with tracer.invoke(SHORT):
                ids = model.inputs[1]["input_ids"].save()
        return ids[0].tolist()

    n, width = len(tok(SHORT).input_ids), len(tok(LONG).input_ids)
    assert tok.pad_token is None and padded_ids() == [tok.eos_token_id] * (width - n) + tok(SHORT).input_ids
    tok.pad_token = "!"  # a pad token wins over eos
    assert padded_ids() == [tok.convert_tokens_to_ids("!")] * (width - n) + tok(SHORT).input_ids
    tok.pad_token, tok.eos_token = None, None  # neither: the config's eos (50256) is not used instead
    assert gpt2.config.eos_token_id is not None
    with pytest.raises(ValueError, match="tokenizer names no pad token.*without a pad token"):
        padded_ids()
    with model.trace() as tracer:  # rows of one length need no padding
        with tracer.invoke("Hello"):
            pass
        with tracer.invoke("World"):
            pass
        with tracer.invoke():
            both = model.output.logits.save()
    torch.testing.assert_close(both, gpt2(**tok(["Hello", "World"], return_tensors="pt")).logits, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_a_tokenizer_it_loads_for_an_encoder_decoder_pads_right(tmp_path, fresh_gpt2_tokenizer):
    """BART reads learned absolute positions in its encoder: a left-padded row would be shifted."""
    torch.manual_seed(7)
    bart = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=50257, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=50256, decoder_start_token_id=2, init_std=0.5, dropout=0.0, attention_dropout=0.0,
    )).eval()
    bart.save_pretrained(tmp_path)
    fresh_gpt2_tokenizer.save_pretrained(tmp_path)
    model = LanguageModel(str(tmp_path), automodel=transformers.AutoModelForSeq2SeqLM, dispatch=True)
    assert model.tokenizer.padding_side == "right"
    start = torch.tensor([[2]])
    with model.trace() as tracer:
        with tracer.invoke(LONG, decoder_input_ids=start):
            pass
        with tracer.invoke(SHORT, decoder_input_ids=start):
            logits = model.output.logits.save()
    alone = model._module(**fresh_gpt2_tokenizer(SHORT, return_tensors="pt"), decoder_input_ids=start).logits
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-4)
