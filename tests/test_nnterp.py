"""nnterp (a library built on nnsight 0.8.1, installed with --no-deps) runs unchanged on ours.

Its ``StandardizedTransformer`` renames each architecture's modules (``rename=``) to
``layers`` / ``self_attn`` / ``mlp`` / ``ln_final`` and checks the renaming with scans and
traces when it is built. Oracles: plain ``register_forward_hook`` runs of the same weights.
"""

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("nnterp") is None:  # installed by scripts/setup.sh; a broken import must fail, not skip
    pytest.skip("pip install --no-deps nnterp==1.3.0 (scripts/setup.sh does)", allow_module_level=True)

from nnterp import StandardizedTransformer  # noqa: E402
from nnterp.interventions import TargetPrompt, logit_lens, patchscope_lens  # noqa: E402

V = 50257
_LLAMA_LIKE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64)
# architecture -> (builder, real path of the blocks, of block i's attention, of its MLP or None)
ARCHS = {
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64)),
             "transformer.h", "attn", "mlp"),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA_LIKE)), "model.layers", "self_attn", "mlp"),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_LLAMA_LIKE)), "model.layers", "self_attn", "mlp"),
    "gemma": (lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(**_LLAMA_LIKE, head_dim=8)), "model.layers",
              "self_attn", "mlp"),
    "opt": (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
        word_embed_proj_dim=32)), "model.decoder.layers", "self_attn", None),
    "bloom": (lambda: transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)),
              "transformer.h", "self_attention", "mlp"),
    "mixtral": (lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)), "model.layers", "self_attn", "mlp"),
}
PROMPT = "The Eiffel Tower is in"


@pytest.fixture
def left_tokenizer(fresh_gpt2_tokenizer):
    # nnterp indexes the last token as position -1, which needs left padding (0.8.1 flips the
    # caller's tokenizer to the left itself; we leave a tokenizer you pass as you set it).
    fresh_gpt2_tokenizer.padding_side = "left"
    return fresh_gpt2_tokenizer


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _plain(hf, tok, prompt, paths, edit=None):
    """Raw outputs at ``paths`` and the logits, from hooks on the plain model; ``edit``: (path, fn)."""
    seen, handles = {}, []
    if edit is not None:
        path, fn = edit
        handles.append(hf.get_submodule(path).register_forward_hook(lambda m, a, o: fn(o)))
    for path in paths:
        handles.append(hf.get_submodule(path).register_forward_hook(lambda m, a, o, p=path: seen.setdefault(p, o)))
    try:
        with torch.no_grad():
            logits = hf(**tok(prompt, return_tensors="pt")).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


@pytest.mark.parametrize("arch", list(ARCHS))
def test_standardized_reads_equal_plain_hooks(arch, left_tokenizer):
    build, blocks, attn, mlp = ARCHS[arch]
    torch.manual_seed(0)
    hf = build().eval()
    model = StandardizedTransformer(hf, tokenizer=left_tokenizer)  # checks its renaming by scanning and tracing
    assert model.num_layers == 2 and model.hidden_size == 32
    assert model.layers[1].path == f"model.{blocks}.1"  # the alias names the real module
    with model.trace(PROMPT):
        attn_out = model.attentions_output[1].save()
        mlp_out = model.mlps_output[1].save() if mlp else None
        layer_out = model.layers_output[1].save()
        logits = model.logits.save()
    paths = [f"{blocks}.1", f"{blocks}.1.{attn}"] + ([f"{blocks}.1.{mlp}"] if mlp else [])
    seen, expected_logits = _plain(hf, left_tokenizer, PROMPT, paths)
    assert torch.allclose(layer_out, _first(seen[f"{blocks}.1"]), atol=1e-5)
    assert torch.allclose(attn_out, _first(seen[f"{blocks}.1.{attn}"]), atol=1e-5)
    if mlp:
        assert torch.allclose(mlp_out, _first(seen[f"{blocks}.1.{mlp}"]), atol=1e-5)
    assert torch.allclose(logits, expected_logits, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mixtral"])
def test_writes_and_steering_equal_a_patched_forward(arch, left_tokenizer):
    build, blocks, _, _ = ARCHS[arch]
    torch.manual_seed(0)
    hf = build().eval()
    model = StandardizedTransformer(hf, tokenizer=left_tokenizer)
    vector = torch.randn(32)
    with model.trace(PROMPT):
        model.steer(layers=0, steering_vector=vector, factor=2.0)
        steered = model.logits.save()
    with model.trace(PROMPT):
        model.layers_output[0] = model.layers_output[0] * 0
        zeroed = model.logits.save()

    def add(out):
        _first(out).add_(2.0 * vector)

    def zero(out):
        _first(out).mul_(0)

    _, expected = _plain(hf, left_tokenizer, PROMPT, [], edit=(f"{blocks}.0", add))
    assert torch.allclose(steered, expected, atol=1e-4)
    _, expected = _plain(hf, left_tokenizer, PROMPT, [], edit=(f"{blocks}.0", zero))
    assert torch.allclose(zeroed, expected, atol=1e-4)


def test_logit_lens_and_patchscope(left_tokenizer):
    build, blocks, _, _ = ARCHS["llama"]
    torch.manual_seed(0)
    hf = build().eval()
    model = StandardizedTransformer(hf, tokenizer=left_tokenizer)
    lens = logit_lens(model, [PROMPT])
    seen, _ = _plain(hf, left_tokenizer, PROMPT, [f"{blocks}.0", f"{blocks}.1"])
    with torch.no_grad():
        expected = torch.stack([
            hf.lm_head(hf.model.norm(_first(seen[f"{blocks}.{i}"])[:, -1])).softmax(-1)[0] for i in range(2)
        ])
    assert lens.shape == (1, 2, V) and torch.allclose(lens[0], expected, atol=1e-5)
    target = TargetPrompt("cat -> cat; hello -> hello; ?", -1)
    probs = patchscope_lens(model, source_prompts=["Paris is"], target_patch_prompts=target)
    assert probs.shape == (1, 2, V) and torch.allclose(probs.sum(-1), torch.ones(1, 2), atol=1e-4)


def test_attention_probabilities_are_the_softmax_and_editable(left_tokenizer):
    build, _, _, _ = ARCHS["llama"]
    torch.manual_seed(0)
    hf = build().eval()
    model = StandardizedTransformer(hf, tokenizer=left_tokenizer, enable_attention_probs=True)
    assert model.attn_probs_available
    with model.trace(PROMPT):
        probs = model.attention_probabilities[0].save()
        model.attention_probabilities[1] = model.attention_probabilities[1] * 0
        out = model.layers[1].self_attn.output[0].save()
    n = len(left_tokenizer(PROMPT).input_ids)
    assert probs.shape == (1, 4, n, n)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 4, n), atol=1e-5)
    assert torch.all(probs.triu(1) == 0)  # causal
    assert torch.allclose(out, torch.zeros_like(out) + hf.model.layers[1].self_attn.o_proj.bias
                          if hf.model.layers[1].self_attn.o_proj.bias is not None else torch.zeros_like(out), atol=1e-6)
