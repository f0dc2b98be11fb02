"""Tracing overhead of the vLLM backend, measured in one run.

    .venv-vllm/bin/python benchmarks/vllm_overhead.py            # SmolLM2-135M, 8 prompts x 32 tokens
    .venv-vllm/bin/python benchmarks/vllm_overhead.py --model /path/to/hf/folder --rounds 7

Plain: ``LLM.generate`` of 32 greedy tokens for 8 prompts. Traced: the same
requests under ``model.trace`` with one invoke per prompt, each saving one decoder
layer's output at every step (32 x 8 saved tensors). ``ignore_eos=True`` makes every
request run all 32 steps, so both do the same model work. Plain and traced runs
alternate, after a warm-up of each; medians are printed, with their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# Before vLLM is imported: in-process engine, a small KV cache, one CPU thread, quiet logs, no network.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "The Eiffel Tower is in the city of",
    "Hello, my name is",
    "The capital of Japan is",
    "One, two, three, four,",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "In 1492, Columbus",
    "A good recipe for pancakes starts with",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="repo id, folder, or smollm2-135m (offline)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each, alternating")
    parser.add_argument("--layer", type=int, default=15)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from vllm import SamplingParams

    from nnsight.modeling.vllm import VLLM

    model = VLLM(args.model, dtype="float32", max_model_len=256, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    layer = model.model.layers[args.layer]

    def plain():
        outputs = model.llm.generate(PROMPTS, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def traced():
        saved = [list() for _ in PROMPTS]
        with model.trace(temperature=0.0, max_tokens=args.tokens, ignore_eos=True) as tracer:
            for i, prompt in enumerate(PROMPTS):
                with tracer.invoke(prompt):
                    for _ in tracer.iter[:]:
                        saved[i].append(layer.output[0])
        return saved  # filled in place by the invokes

    reference = plain()
    saved = traced()
    assert [len(s) for s in saved] == [args.tokens] * len(PROMPTS), [len(s) for s in saved]
    plain_t, traced_t = [], []
    for _ in range(args.rounds):
        for fn, out in ((plain, plain_t), (traced, traced_t)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    assert plain() == reference
    p, t = statistics.median(plain_t), statistics.median(traced_t)
    print(f"model {args.model}: {len(PROMPTS)} prompts x {args.tokens} greedy tokens, torch threads {torch.get_num_threads()}")
    print(f"plain LLM.generate                          {p * 1e3:9.1f} ms  (median of {args.rounds})")
    print(f"model.trace, layer {args.layer} output saved per step   {t * 1e3:9.1f} ms  (median of {args.rounds})")
    print(f"ratio traced / plain                        {t / p:9.3f}x")
    print("all runs (s): plain " + " ".join(f"{x:.2f}" for x in plain_t) + " | traced " + " ".join(f"{x:.2f}" for x in traced_t))


if __name__ == "__main__":
    main()
