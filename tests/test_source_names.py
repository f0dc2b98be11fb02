"""``.source`` operation names against the listing nnsight 0.8.1 prints for the same modules.

tests/fixtures/source_names_081.json was recorded with nnsight 0.8.1 and transformers 5.24
(tests/fixtures/record_source_names_081.py). 0.8.1 also names assignments (``attn_output_0``
for ``attn_output = ...``) and counts them in the same numbering as calls; we name call
sites only. So every call name here must be 0.8.1's name for the same call on the same
line, except where an assignment to the same name comes first (GPT-2's and Llama's
``attention_interface = ...get_interface(...)``): there 0.8.1's call is
``attention_interface_1`` and ours ``attention_interface_0``, the name libraries written for
earlier nnsight versions (nnterp) use.
"""

import functools
import json
import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nnsight.tracing.source import source_info  # noqa: E402

RECORDED = json.loads((pathlib.Path(__file__).parent / "fixtures" / "source_names_081.json").read_text())


@functools.cache
def _modules():
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, n_positions=64,
                                                                attn_implementation="eager"))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager"))
    return {
        "gpt2.attn": gpt2.transformer.h[0].attn, "gpt2.mlp": gpt2.transformer.h[0].mlp,
        "llama.self_attn": llama.model.layers[0].self_attn, "llama.mlp": llama.model.layers[0].mlp,
    }


def _ours(module):
    """Our call names with their line numbered as 0.8.1 prints them (the source's first line is
    marked ``*``, the next one is 0)."""
    info = source_info(type(module))
    return {name: line - info.first_line - 1 for name, line in info.operations.items()}


ASSIGNED_FIRST = {("gpt2.attn", "attention_interface"), ("llama.self_attn", "attention_interface")}


@pytest.mark.parametrize("key", sorted(RECORDED["listings"]))
def test_call_names_and_numbers_match_the_0_8_1_listing(key):
    if transformers.__version__ != RECORDED["transformers"]:
        pytest.skip(f"recorded under transformers {RECORDED['transformers']}")
    theirs = RECORDED["listings"][key]
    ours = _ours(_modules()[key])
    print(f"\n{key}\n  ours:  {sorted(ours)}\n  0.8.1: {sorted(theirs)}")
    for name, line in ours.items():
        base = name.rsplit("_", 1)[0]
        if (key, base) in ASSIGNED_FIRST:
            number = int(name.rsplit("_", 1)[1])
            assert theirs.get(f"{base}_{number + 1}") == line, name
        else:
            assert theirs.get(name) == line, f"{name} (line {line}) is {theirs.get(name)} in 0.8.1"


def test_the_names_scripts_use():
    mods = _modules()
    gpt2_attn, llama_attn = _ours(mods["gpt2.attn"]), _ours(mods["llama.self_attn"])
    assert {"split_1", "self_c_proj_0", "attention_interface_0", "self_c_attn_1"} <= set(gpt2_attn)
    assert {"self_q_proj_0", "view_0", "transpose_0", "self_o_proj_0", "apply_rotary_pos_emb_0"} <= set(llama_attn)
    assert "call_split_1" not in gpt2_attn
