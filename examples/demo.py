"""End-to-end tour of nnsight on a real model that needs no network: SmolLM2-135M-Instruct.

    bash scripts/demo.sh            # installs, converts the model once (~1 min), runs this

What it shows: reading hidden states, zeroing and patching activations and the
effect on the prediction, a logit lens over every layer (saved as a heatmap
picture), and generation with a per-step intervention.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import torch

from nnsight import LanguageModel

torch.set_num_threads(1)
OUT = pathlib.Path(os.environ.get("NNSIGHT_DEMO_OUT", "out"))


def top(tokenizer, logits, k=3):
    probs = logits.detach().softmax(-1)
    values, ids = probs.topk(k)
    return ", ".join(f"{tokenizer.decode(int(i))!r} {float(p):.0%}" for p, i in zip(values, ids))


def main():
    start = time.perf_counter()
    model = LanguageModel("smollm2-135m")
    tok = model.tokenizer
    layers = model.model.layers
    print(f"Loaded SmolLM2-135M lazily ({len(layers)} layers, d={model.config.hidden_size}) "
          f"in {time.perf_counter() - start:.1f} s\n")

    prompt = "The Eiffel Tower is in the city of"
    other = "The Colosseum is in the city of"

    # 1. Read hidden states and the prediction.
    with model.trace(prompt):
        hidden = layers[15].output.save()
        logits = model.lm_head.output[0, -1].save()
    print(f"1. Prediction for {prompt!r}: {top(tok, logits)}")
    print(f"   layer 15 hidden states: shape {tuple(hidden.shape)}, mean norm {hidden.norm(dim=-1).mean():.1f}\n")

    # 2. Zero the MLP outputs of the first layers and watch the prediction change.
    with model.trace(prompt):
        for i in range(4):
            layers[i].mlp.output[:] = 0
        zeroed = model.lm_head.output[0, -1].save()
    print(f"2. With the MLPs of layers 0-3 zeroed: {top(tok, zeroed)}\n")

    # 3. Patch the residual stream from another prompt (same length) into this one.
    with model.trace() as tracer:
        source = []
        with tracer.invoke(other):
            for i in range(8):
                source.append(layers[i].output)
        with tracer.invoke(prompt):
            for i in range(8):
                layers[i].output = source[i]
            patched = model.lm_head.output[0, -1].save()
    print(f"3. With layers 0-7 patched from {other!r}: {top(tok, patched)}\n")

    # 4. Logit lens: decode every layer's residual stream through the final norm and head.
    tokens = [tok.decode(t) for t in tok(prompt).input_ids]
    with model.trace(prompt):
        lens = []
        for layer in layers:
            lens.append(model.lm_head(model.model.norm(layer.output))[0].softmax(-1).max(-1))
        lens = nnsight_save(lens)
    probs = torch.stack([p.values for p in lens]).detach()
    ids = torch.stack([p.indices for p in lens])
    print("4. Logit lens, top token at the last position by layer:")
    print("   " + " | ".join(f"L{i}:{tok.decode(int(ids[i, -1]))!r}" for i in range(0, len(layers), 5)) + "\n")
    picture = save_heatmap(probs, ids, tokens, tok)

    # 5. Generation with an intervention on one step only.
    with model.generate(prompt, max_new_tokens=6, do_sample=False) as tracer:
        steps = list().save()
        for step in tracer.iter[:]:
            if step == 1:
                layers[10].output[:] = 0
            steps.append(model.lm_head.output[0, -1].argmax(-1))
        tokens_out = tracer.result.save()
    with model.generate(prompt, max_new_tokens=6, do_sample=False) as tracer:
        clean = tracer.result.save()
    print(f"5. Greedy continuation:                      {tok.decode(clean[0][-6:])!r}")
    print(f"   with layer 10 zeroed on step 1 only:       {tok.decode(tokens_out[0][-6:])!r}")
    print(f"\nLogit-lens heatmap written to {picture}. Total time {time.perf_counter() - start:.1f} s.")


def nnsight_save(value):
    import nnsight

    return nnsight.save(value)


def save_heatmap(probs, ids, tokens, tok):
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "logit_lens.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("   (install the [viz] extra to get the heatmap picture)", file=sys.stderr)
        return None
    n_layers, n_pos = probs.shape
    fig, ax = plt.subplots(figsize=(1.3 * n_pos + 2, 0.32 * n_layers + 1.5))
    ax.imshow(probs.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for layer in range(n_layers):
        for pos in range(n_pos):
            text = tok.decode(int(ids[layer, pos])).strip()[:8] or repr(tok.decode(int(ids[layer, pos])))
            color = "black" if probs[layer, pos] > 0.6 else "white"
            ax.text(pos, layer, text, ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(n_pos), [t.strip() or repr(t) for t in tokens], rotation=30)
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title("Logit lens: top next token (colour = its probability)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
