"""``TransformersModel`` (task or automodel) and the loading options 0.8.1 accepts."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nnsight import LanguageModel, TransformersModel  # noqa: E402


@pytest.fixture
def folder(tmp_path, gpt2, fresh_gpt2_tokenizer):
    gpt2.save_pretrained(tmp_path)
    fresh_gpt2_tokenizer.save_pretrained(tmp_path)
    return tmp_path


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50257, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertForMaskedLM(config).eval()


def test_text_generation_is_the_language_model_case(folder, gpt2, fresh_gpt2_tokenizer):
    model = TransformersModel(str(folder), task="text-generation")
    assert isinstance(model, LanguageModel) and model.task == "text-generation"
    assert LanguageModel(gpt2, tokenizer=fresh_gpt2_tokenizer).task == "text-generation"  # as in 0.8.1
    assert not model.dispatched
    with model.trace("Hello world"):
        logits = model.lm_head.output.save()
    assert model.dispatched
    assert torch.allclose(logits, gpt2(**fresh_gpt2_tokenizer("Hello world", return_tensors="pt")).logits, atol=1e-5)
    with model.generate("Hello", max_new_tokens=2) as tracer:
        tokens = tracer.result.save()
    assert tokens.shape == (1, 3)


def test_task_is_inferred_from_the_class_or_the_config(folder, fresh_gpt2_tokenizer, block_hidden):
    bert = _bert()
    model = TransformersModel(bert, tokenizer=fresh_gpt2_tokenizer)
    assert model.task == "fill-mask"
    with model.trace("Paris is the capital of"):
        hidden = model.bert.encoder.layer[-1].output.save()
        logits = model.output.logits.save()
    assert torch.allclose(logits, bert(**fresh_gpt2_tokenizer("Paris is the capital of", return_tensors="pt")).logits, atol=1e-5)
    assert block_hidden(hidden).shape[-1] == 32  # a BERT layer returns a tuple under transformers 4
    assert TransformersModel(str(folder)).task == "text-generation"  # config.architectures = GPT2LMHeadModel


def test_automodel_and_bad_tasks(folder):
    model = TransformersModel(str(folder), automodel="AutoModel")
    assert type(model._module).__name__ == "GPT2Model"
    with pytest.raises(ValueError, match="unknown task 'texting'"):
        TransformersModel(str(folder), task="texting")
    with pytest.raises(ValueError, match="cannot tell the task of 'Linear'"):
        TransformersModel(torch.nn.Linear(2, 2))


def test_tokenizer_kwargs_reach_the_tokenizer(folder, fresh_gpt2_tokenizer):
    model = LanguageModel(str(folder), tokenizer_kwargs={"padding_side": "right", "model_max_length": 77})
    assert model.tokenizer.padding_side == "right" and model.tokenizer.model_max_length == 77
    passed = LanguageModel(str(folder), tokenizer=fresh_gpt2_tokenizer, tokenizer_kwargs={"padding_side": "left"})
    assert passed.tokenizer is fresh_gpt2_tokenizer and fresh_gpt2_tokenizer.padding_side == "left"  # as 0.8.1 does
    with pytest.raises(TypeError, match="tokenizer_kwargs must be a dict"):
        LanguageModel(str(folder), tokenizer_kwargs=["padding_side"])


def test_attn_implementation_reaches_the_meta_build_and_the_weights(folder):
    lazy = LanguageModel(str(folder), attn_implementation="eager")
    assert lazy.config._attn_implementation == "eager" and not lazy.dispatched
    lazy.dispatch()
    assert lazy.dispatched and lazy.config._attn_implementation == "eager"
    assert LanguageModel(str(folder), attn_implementation="sdpa").config._attn_implementation == "sdpa"


def test_attn_implementation_switches_a_built_model(gpt2, gpt2_tokenizer):
    before = gpt2.config._attn_implementation
    try:
        model = LanguageModel(gpt2, tokenizer=gpt2_tokenizer, attn_implementation="eager", device_map="auto")
        assert model.config._attn_implementation == "eager"  # device_map means nothing for a built model
    finally:
        gpt2.set_attn_implementation(before)


def test_trust_remote_code_and_revision_reach_config_and_tokenizer(folder, monkeypatch):
    calls = []
    real_config, real_tokenizer = transformers.AutoConfig.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def config(*args, **kwargs):
        calls.append(("config", kwargs))
        return real_config(*args, **kwargs)

    def tokenizer(*args, **kwargs):
        calls.append(("tokenizer", kwargs))
        return real_tokenizer(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    LanguageModel(str(folder), trust_remote_code=True, device_map="cpu")
    assert {name for name, _ in calls} == {"config", "tokenizer"}
    for _, kwargs in calls:
        assert kwargs.get("trust_remote_code") is True and "device_map" not in kwargs


def test_the_weights_path_does_not_shadow_source(folder):
    model = LanguageModel(str(folder))
    assert not isinstance(model.source, str)
