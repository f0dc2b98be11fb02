"""PEFT LoRA adapters on a LanguageModel, checked against peft's own PeftModel and plain hooks."""

import pytest
import torch

peft = pytest.importorskip("peft")

from nnsight import LanguageModel, NNsightError  # noqa: E402

PROMPT = "The Eiffel Tower is in"


@pytest.fixture
def reference(make_gpt2):
    """``reference(folder)``: peft's own PeftModel of the adapter saved there, on a fresh base."""
    return lambda folder: peft.PeftModel.from_pretrained(make_gpt2(), str(folder)).eval()


def _ids(tok):
    return tok(PROMPT, return_tensors="pt")


@pytest.fixture
def adapted(fresh_gpt2, gpt2_tokenizer, lora_dirs):
    model = LanguageModel(fresh_gpt2, tokenizer=gpt2_tokenizer)
    return model.load_adapter(lora_dirs[0])


def test_traced_output_equals_peft_model(adapted, gpt2_tokenizer, lora_dirs, reference, gpt2_module):
    with adapted.trace(PROMPT):
        logits = adapted.lm_head.output.save()
    with torch.no_grad():
        expected = reference(lora_dirs[0])(**_ids(gpt2_tokenizer)).logits
        base = gpt2_module(**_ids(gpt2_tokenizer)).logits
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, base)  # the adapter really changes the model


def test_lora_modules_are_envoys_read_like_plain_hooks(adapted):
    layer = adapted._module.transformer.h[1].attn.c_attn
    seen = {}
    handle = layer.lora_A["default"].register_forward_hook(lambda m, i, o: seen.setdefault("a", o.clone()))
    try:
        with adapted.trace(PROMPT):
            base_out = adapted.transformer.h[1].attn.c_attn.base_layer.output.save()
            lora_a = adapted.transformer.h[1].attn.c_attn.lora_A["default"].output.save()
    finally:
        handle.remove()
    torch.testing.assert_close(lora_a, seen["a"])
    assert lora_a.shape[-1] == 4 and base_out.shape[-1] == 96


def test_zeroing_every_lora_b_gives_the_base_model(adapted, gpt2_tokenizer, gpt2_module):
    with adapted.trace(PROMPT):
        for block in adapted.transformer.h:
            block.attn.c_attn.lora_B["default"].output = 0
            block.mlp.c_fc.lora_B["default"].output = 0
        logits = adapted.lm_head.output.save()
    with torch.no_grad():
        base = gpt2_module(**_ids(gpt2_tokenizer)).logits
    torch.testing.assert_close(logits, base)


def test_editing_lora_b_matches_a_hand_patched_forward(adapted, gpt2_tokenizer, lora_dirs, reference):
    with adapted.trace(PROMPT):
        adapted.transformer.h[0].attn.c_attn.lora_B["default"].output *= 3
        logits = adapted.lm_head.output.save()
    peft_model = reference(lora_dirs[0])
    lora_b = peft_model.base_model.model.transformer.h[0].attn.c_attn.lora_B["default"]
    handle = lora_b.register_forward_hook(lambda m, i, o: o * 3)
    try:
        with torch.no_grad():
            expected = peft_model(**_ids(gpt2_tokenizer)).logits
    finally:
        handle.remove()
    torch.testing.assert_close(logits, expected)


def test_adapter_none_runs_the_base_model_for_that_trace_only(adapted, gpt2_tokenizer, lora_dirs, reference, gpt2_module):
    grads = [p.requires_grad for p in adapted._module.parameters()]
    with adapted.trace(PROMPT, adapter=None):
        off = adapted.lm_head.output.save()
    with adapted.trace(PROMPT):
        on = adapted.lm_head.output.save()
    with torch.no_grad():
        base = gpt2_module(**_ids(gpt2_tokenizer)).logits
        expected = reference(lora_dirs[0])(**_ids(gpt2_tokenizer)).logits
    torch.testing.assert_close(off, base)
    torch.testing.assert_close(on, expected)
    assert adapted.active_adapter == "default"
    assert [p.requires_grad for p in adapted._module.parameters()] == grads


def test_two_adapters_switch_between_traces(adapted, gpt2_tokenizer, lora_dirs, reference):
    adapted.load_adapter(lora_dirs[1], adapter_name="other")
    assert adapted.adapters == ["default", "other"] and adapted.active_adapter == "other"
    with adapted.trace(PROMPT):
        second = adapted.lm_head.output.save()
    with adapted.trace(PROMPT, adapter="default"):
        first = adapted.lm_head.output.save()
    adapted.set_adapter("default")
    with adapted.trace(PROMPT):
        first_again = adapted.lm_head.output.save()
    with torch.no_grad():
        expected_a = reference(lora_dirs[0])(**_ids(gpt2_tokenizer)).logits
        expected_b = reference(lora_dirs[1])(**_ids(gpt2_tokenizer)).logits
    torch.testing.assert_close(first, expected_a)
    torch.testing.assert_close(first_again, expected_a)
    torch.testing.assert_close(second, expected_b)


def test_generate_with_adapter_matches_peft_generate(adapted, gpt2_tokenizer, lora_dirs, reference):
    with adapted.generate(PROMPT, max_new_tokens=3, do_sample=False) as tracer:
        for step in tracer.iter[:]:
            adapted.transformer.h[0].attn.c_attn.lora_A["default"].output  # read at every step
        tokens = tracer.result.save()
    with torch.no_grad():
        expected = reference(lora_dirs[0]).generate(
            **_ids(gpt2_tokenizer), max_new_tokens=3, do_sample=False, pad_token_id=gpt2_tokenizer.eos_token_id
        )
    assert tokens.tolist() == expected.tolist()


def test_peft_option_and_unloading(fresh_gpt2, gpt2_tokenizer, lora_dirs, gpt2_module):
    model = LanguageModel(fresh_gpt2, tokenizer=gpt2_tokenizer, peft=lora_dirs[0])
    assert model.adapters == ["default"]
    model.load_adapter(None)
    assert model.adapters == [] and type(model.transformer.h[0].attn.c_attn._module).__name__ == "Conv1D"
    with model.trace(PROMPT):
        logits = model.lm_head.output.save()
    with torch.no_grad():
        torch.testing.assert_close(logits, gpt2_module(**_ids(gpt2_tokenizer)).logits)


def test_bad_requests_name_the_problem_and_leave_the_model(adapted, tmp_path, gpt2_module):
    with pytest.raises(NNsightError, match=r"no adapter named \['missing'\].*loaded: \['default'\]"):
        with adapted.trace(PROMPT, adapter="missing"):
            adapted.lm_head.output.save()
    with pytest.raises(FileNotFoundError, match="nope"):
        adapted.load_adapter(tmp_path / "nope", adapter_name="default")
    assert adapted.adapters == ["default"] and adapted.active_adapter == "default"
    plain = LanguageModel(gpt2_module)
    with pytest.raises(NNsightError, match="no adapters loaded"):
        with plain.trace(PROMPT if plain.tokenizer else [1, 2, 3], adapter="default"):
            plain.lm_head.output.save()


def test_readme_example_runs(fresh_gpt2, gpt2_tokenizer, lora_dirs, gpt2_module, tmp_path, reference, readme_example):
    scope = readme_example("Adapters (PEFT)", {
        'LanguageModel("openai-community/gpt2", peft="out/lora")': "LanguageModel(base, tokenizer=tok, peft=lora)",
        '"out/other"': "other",
        "print(": "(",
    }, {"base": fresh_gpt2, "tok": gpt2_tokenizer, "lora": lora_dirs[0], "other": lora_dirs[1]}, tmp_path)
    model = scope["model"]
    assert model.adapters == [] and scope["low_rank"].shape == (1, 1, 4)
    with torch.no_grad():
        expected_first = reference(lora_dirs[0])(**gpt2_tokenizer("Hello", return_tensors="pt")).logits
        base = gpt2_module(**gpt2_tokenizer("Hello", return_tensors="pt")).logits
    torch.testing.assert_close(scope["first"], expected_first)
    torch.testing.assert_close(scope["base"], base)


def test_disabling_and_enabling_between_traces(adapted, gpt2_tokenizer, lora_dirs, reference, gpt2_module):
    def logits():
        with adapted.trace(PROMPT):
            out = adapted.lm_head.output.save()
        return out

    with torch.no_grad():
        base = gpt2_module(**_ids(gpt2_tokenizer)).logits
        expected = reference(lora_dirs[0])(**_ids(gpt2_tokenizer)).logits
    adapted.disable_adapters()
    torch.testing.assert_close(logits(), base)
    assert adapted.active_adapter is None
    adapted.enable_adapters()
    torch.testing.assert_close(logits(), expected)
    with adapted.disable_adapter():
        torch.testing.assert_close(logits(), base)
    torch.testing.assert_close(logits(), expected)
