"""Tracing overhead against plain PyTorch, measured in one run.

    python benchmarks/overhead.py                         # this checkout
    python benchmarks/overhead.py --reference /tmp/ref081/bin/python   # plus nnsight 0.8.1, side by side
    python benchmarks/overhead.py --quick                 # fewer repetitions

Every case uses only the public API, so the very same file runs under another
interpreter that has the public ``nnsight`` installed (``--reference``); both
columns come from the same run on the same machine. Plain and traced code are
timed in alternating blocks and medians are reported, with torch on one thread.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).resolve().parent
TOKENIZER = HERE.parent / "tests" / "fixtures" / "gpt2-tokenizer"


# CPU time of this thread: on a shared 2-core machine wall time mostly measures the
# neighbours (the engine and 0.8.1 both run everything in this thread, on greenlets).
CLOCK = time.thread_time


def _blocks(plain, traced, calls, rounds):
    """Best µs per call of ``plain`` and ``traced`` over ``rounds`` alternating blocks.

    Interference only ever adds time, so the fastest block is the estimate least
    disturbed by it (as ``timeit`` advises).
    """
    for _ in range(max(3, calls // 10)):
        plain()
        traced()
    plain_t, traced_t = [], []
    for _ in range(rounds):
        for fn, out in ((plain, plain_t), (traced, traced_t)):
            start = CLOCK()
            for _ in range(calls):
                fn()
            out.append((CLOCK() - start) / calls * 1e6)
    return min(plain_t), min(traced_t)


def small_cases(quick):
    import torch
    from nnsight import NNsight

    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    model = NNsight(net)
    x = torch.randn(1, 64)
    calls, rounds = (200, 7) if quick else (500, 15)

    def plain():
        net(x)

    def empty():
        with model.trace(x):
            pass

    def one_save():
        with model.trace(x):
            hidden = model[0].output.save()
        return hidden

    p, e = _blocks(plain, empty, calls, rounds)
    p2, s = _blocks(plain, one_save, calls, rounds)
    return {"plain_2layer_us": p, "empty_trace_us": e - p, "one_save_trace_us": s - p2}


def floor_case(quick):
    """What any greenlet-based engine pays: a fresh greenlet run to its end, and one switch pair.

    Each invoke's body runs on a fresh greenlet (a reused one crashes PyTorch's C++
    error backtraces, see ``tracing/interleaver.py``), and CPython maps a new frame
    stack chunk for every greenlet (one ``mmap``/``munmap`` pair); every delivered
    value costs a switch into the body and back.
    """
    import greenlet

    n, rounds = (20000, 5) if quick else (50000, 9)

    def body(value):
        return value

    def fresh():
        greenlet.greenlet(body).switch(1)

    main = greenlet.getcurrent()

    def loop(value):
        while True:
            value = main.switch(value)

    parked = greenlet.greenlet(loop)
    parked.switch(0)

    def nothing():
        pass

    _, created = _blocks(nothing, fresh, n, rounds)
    base, switched = _blocks(nothing, lambda: parked.switch(1), n, rounds)
    return {
        "floor_fresh_greenlet_us": created - base, "floor_switch_pair_us": switched - base,
        "floor_forward_hook_us": _hook_floor(quick),
    }


def _hook_floor(quick):
    """What torch charges for one module's forward hook that does nothing (each delivered value needs one)."""
    import torch

    bare = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(100)])
    hooked = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(100)])
    for layer in hooked:
        layer.register_forward_hook(lambda module, args, output: None)
    x = torch.randn(1, 64)
    calls, rounds = (20, 7) if quick else (50, 11)
    plain, with_hooks = _blocks(lambda: bare(x), lambda: hooked(x), calls, rounds)
    return (with_hooks - plain) / len(hooked)


# Every site's text differs (as an edited notebook cell does), so no cache keyed by text helps.
COLD_TEMPLATE = '''
def site_{i}(model, x):
    with model.trace(x):
        hidden = model[0].output.save()
        scaled_{i} = hidden * {i}
    return hidden
'''


def cold_case(quick):
    import torch
    from nnsight import NNsight

    n = 20 if quick else 60
    model = NNsight(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)))
    x = torch.randn(1, 64)
    folder = tempfile.mkdtemp()
    path = pathlib.Path(folder) / "cold_sites.py"
    path.write_text("".join(COLD_TEMPLATE.format(i=i) for i in range(n)))
    spec = importlib.util.spec_from_file_location("cold_sites", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.site_0(model, x)  # warm the library itself
    cold, warm = [], []
    for i in range(1, n):
        fn = getattr(module, f"site_{i}")
        start = time.perf_counter()
        fn(model, x)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        fn(model, x)
        warm.append(time.perf_counter() - start)
    return {"cold_call_site_us": (statistics.median(cold) - statistics.median(warm)) * 1e6}


# The first `with model.trace` of a process, after the imports and the model: what it pays once
# (lazily imported machinery, first compiles, reading its source) shows as first minus second.
# A script has other code than the trace: 400 lines of it here.
FRESH_SCRIPT = '''
import sys, time
import torch
from nnsight import NNsight
''' + "".join(f"\n\ndef helper_{i}(a, b):\n    c = a * b + {i}\n    return [c for _ in range(3)]\n" for i in range(80)) + '''

torch.set_num_threads(1)
model = NNsight(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)))
x = torch.randn(1, 64)


def trace():
    with model.trace(x):
        hidden = model[0].output.save()
    return hidden


times = []
for _ in range(2):
    start = time.perf_counter()
    trace()
    times.append(time.perf_counter() - start)
print(times[0], times[1])
'''


def fresh_process_case(quick):
    folder = tempfile.mkdtemp()
    path = pathlib.Path(folder) / "fresh_trace.py"
    path.write_text(FRESH_SCRIPT)
    firsts, seconds = [], []
    for _ in range(7 if quick else 15):  # a few ms each, against a noisy start: many runs, medians
        done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, check=True)
        first, second = map(float, done.stdout.split()[-2:])
        firsts.append(first)
        seconds.append(second)
    return {
        "fresh_first_trace_ms": statistics.median(firsts) * 1e3,
        "fresh_first_trace_extra_ms": (statistics.median(firsts) - statistics.median(seconds)) * 1e3,
    }


def deep_cases(quick):
    import torch
    from nnsight import NNsight

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(100)])
    model = NNsight(net)
    x = torch.randn(1, 64)
    calls, rounds = (20, 7) if quick else (50, 11)
    layers = list(model)

    def plain():
        net(x)

    def empty():
        with model.trace(x):
            pass

    def save_all():
        with model.trace(x):
            for layer in layers:
                layer.output.save()

    def read_write_all():
        with model.trace(x):
            for layer in layers:
                layer.output = layer.output * 1

    y = torch.randn(1, 64)

    def multiplies():
        for _ in range(100):
            y * 1

    _, e = _blocks(plain, empty, calls, rounds)
    _, s = _blocks(plain, save_all, calls, rounds)
    _, rw = _blocks(plain, read_write_all, calls, rounds)
    _, mul = _blocks(plain, multiplies, calls, rounds)
    return {"per_save_us": (s - e) / 100, "per_read_write_us": (rw - e - mul) / 100}


def gpt2_case(quick):
    import torch
    import transformers
    from nnsight import NNsight

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12)
    hf = transformers.GPT2LMHeadModel(config).eval()
    model = NNsight(hf)
    ids = torch.randint(0, 50257, (1, 32))
    rounds = 7 if quick else 21

    def plain():
        with torch.no_grad():
            hf(ids)

    def traced():
        with torch.no_grad():
            with model.trace(ids):
                for i in range(12):
                    model.transformer.h[i].output.save()

    def traced_source():
        with torch.no_grad():
            with model.trace(ids):
                for i in range(12):
                    model.transformer.h[i].attn.source.self_c_proj_0.output.save()
                    model.transformer.h[i].output.save()

    ratios, source_ratios = [], []
    for _ in range(3):
        plain()
        traced()
        traced_source()
    for _ in range(rounds):
        p, t = _blocks(plain, traced, 2, 1)
        ratios.append(t / p)
        t2, s = _blocks(traced, traced_source, 2, 1)
        source_ratios.append(s / t2)
    return {"gpt2_small_12_saves_ratio": statistics.median(ratios), "gpt2_source_ratio": statistics.median(source_ratios)}


def _lm(n_layer, n_embd, n_head, **config_options):
    import torch
    import transformers
    from nnsight import LanguageModel

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, **config_options)
    hf = transformers.GPT2LMHeadModel(config).eval()
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(TOKENIZER))
    return hf, LanguageModel(hf, tokenizer=tok)


def _generation_pair(hf, model, prompt, steps, saved, pad=50256):
    """Plain ``generate`` and the same under ``model.generate`` saving ``saved()``'s output each step."""
    import torch

    mask = torch.ones_like(prompt)
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=pad)

    def plain():
        with torch.no_grad():
            hf.generate(prompt, attention_mask=mask, **kwargs)

    def traced():
        with torch.no_grad():
            with model.generate(prompt, **kwargs) as tracer:
                hidden = list().save()
                for step in tracer.iter[:]:
                    hidden.append(saved().output)
        return hidden

    return plain, traced


def generate_cases(quick):
    import torch

    results = {}
    prompt = torch.randint(0, 50257, (1, 8))
    for name, dims, rounds in (("gen_tiny", (2, 64, 4), 9 if quick else 21), ("gen_gpt2_small", (12, 768, 12), 3 if quick else 7)):
        hf, model = _lm(*dims)
        plain, traced = _generation_pair(hf, model, prompt, 20, lambda: model.transformer.h[-1])

        ratios, overheads = [], []
        for _ in range(2):
            plain()
            traced()
        for _ in range(rounds):
            p, t = _blocks(plain, traced, 1, 1)
            ratios.append(t / p)
            overheads.append((t - p) / 20)
        results[f"{name}_ratio"] = statistics.median(ratios)
        results[f"{name}_us_per_step"] = statistics.median(overheads)
    return results


def scaling_case(quick):
    """Cost of N saves in one trace of a 1000-layer Sequential: should be linear in N."""
    import torch
    from nnsight import NNsight

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(1000)])
    model = NNsight(net)
    x = torch.randn(1, 16)
    layers = list(model)
    calls, rounds = (3, 5) if quick else (5, 9)

    def saving(n):
        chosen = layers[:n]

        def run():
            with model.trace(x):
                for layer in chosen:
                    layer.output.save()

        return run

    def empty():
        with model.trace(x):
            pass

    results, points = {}, []
    for n in (1, 10, 100, 1000):
        e, t = _blocks(empty, saving(n), calls, rounds)
        results[f"saves_{n}_us"] = t - e
        points.append((n, t - e))
    mean_n = statistics.mean(n for n, _ in points)
    mean_t = statistics.mean(t for _, t in points)
    slope = sum((n - mean_n) * (t - mean_t) for n, t in points) / sum((n - mean_n) ** 2 for n, _ in points)
    results["saves_slope_us"] = slope
    return results


def invokes_case(quick):
    """1, 8 and 64 one-token prompt invokes in one trace of a 2-layer model: cost per extra invoke."""
    import torch

    hf, model = _lm(2, 64, 4)
    rounds = 5 if quick else 11
    overhead = {}
    for k in (1, 8, 64):
        ids = torch.randint(0, 50257, (k, 1))

        def plain():
            with torch.no_grad():
                hf(ids)

        def traced():
            with torch.no_grad():
                with model.trace() as tracer:
                    for i in range(k):
                        with tracer.invoke(ids[i : i + 1]):
                            model.lm_head.output.save()

        p, t = _blocks(plain, traced, 3, rounds)
        overhead[k] = t - p
    return {"invokes_1_us": overhead[1], "per_extra_invoke_us": (overhead[64] - overhead[1]) / 63}


def generate_long_case(quick):
    """100 generated tokens on a tiny model, one save per step: overhead per step."""
    import torch

    # A 512-token vocabulary: with GPT-2's 50,257 the lm_head and the end-of-sequence checks
    # make a step ~1.7 ms and its noise here (±100 µs) larger than the overhead measured.
    hf, model = _lm(2, 64, 4, vocab_size=512, bos_token_id=0, eos_token_id=0)
    steps = 100
    plain, traced = _generation_pair(hf, model, torch.randint(1, 512, (1, 4)), steps, lambda: model.lm_head, pad=0)

    p, t = _blocks(plain, traced, 1, 15 if quick else 31)
    return {"gen100_us_per_step": (t - p) / steps}


def memory_hidden_case(quick):
    """1,000 traces each saving 12 hidden states, dropped at once: RSS flat, nothing kept alive."""
    import gc
    import weakref

    import torch
    from nnsight import NNsight

    net = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(12)])
    model = NNsight(net)
    x = torch.randn(8, 256)
    layers = list(model)
    alive = []

    def run():
        with model.trace(x):
            states = [layer.output.save() for layer in layers]
        alive.append(weakref.ref(states[-1]))

    for _ in range(50):
        run()
    gc.collect()
    rss0 = _rss_mb()
    for _ in range(1000):
        run()
    gc.collect()
    return {
        "rss_growth_mb_12_states": _rss_mb() - rss0,
        "tensors_kept_alive": sum(ref() is not None for ref in alive),
    }


def memory_case(quick):
    import torch
    from nnsight import NNsight

    model = NNsight(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)))
    x = torch.randn(1, 64)

    def run():
        with model.trace(x):
            hidden = model[0].output.save()
        return hidden

    for _ in range(100):
        run()
    rss0, threads0 = _rss_mb(), threading.active_count()
    for _ in range(1000):
        run()
    return {"rss_growth_mb_1000_traces": _rss_mb() - rss0, "thread_growth_1000_traces": threading.active_count() - threads0}


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


CASES = [
    small_cases, floor_case, cold_case, fresh_process_case, deep_cases, scaling_case, invokes_case, memory_case,
    memory_hidden_case, gpt2_case,
    generate_cases, generate_long_case,
]
GENERATION = (generate_cases, generate_long_case)


def worker(quick, skip_generate, only=None):
    import torch

    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    results = {}
    for case in CASES:
        if skip_generate and case in GENERATION:
            continue
        if only and case.__name__ not in only:
            continue
        try:
            results.update(case(quick))
        except Exception as error:  # one case failing under a library version still reports the others
            print(f"case {case.__name__} failed: {type(error).__name__}: {error}", file=sys.stderr)
    return results


ROWS = [
    ("plain_2layer_us", "plain 2-layer forward (µs)", None),
    ("empty_trace_us", "empty trace, over plain (µs)", 30),
    ("one_save_trace_us", "one-save trace, over plain (µs)", 40),
    ("floor_fresh_greenlet_us", "floor: a fresh greenlet, started and ended (µs)", None),
    ("floor_switch_pair_us", "floor: one greenlet switch pair (µs)", None),
    ("floor_forward_hook_us", "floor: one no-op torch forward hook (µs)", None),
    ("cold_call_site_us", "first trace at a new call site, extra (µs)", None),
    ("fresh_first_trace_ms", "first trace in a fresh process (ms)", None),
    ("fresh_first_trace_extra_ms", "first trace in a fresh process, over the second (ms)", None),
    ("per_save_us", "per .output.save(), 100-layer (µs)", 8),
    ("per_read_write_us", "per read-and-write, 100-layer (µs)", 12),
    ("gpt2_small_12_saves_ratio", "GPT-2-small, 12 saves (traced/plain)", 1.01),
    ("gpt2_source_ratio", "GPT-2-small, + .source op in every layer (ratio)", 1.02),
    ("saves_1_us", "1 save in a 1000-layer Sequential, over empty (µs)", None),
    ("saves_10_us", "10 saves, over empty (µs)", None),
    ("saves_100_us", "100 saves, over empty (µs)", None),
    ("saves_1000_us", "1000 saves, over empty (µs)", None),
    ("saves_slope_us", "cost per save, fitted slope (µs)", 8),
    ("invokes_1_us", "1 invoke, 2-layer LM, over plain (µs)", None),
    ("per_extra_invoke_us", "per extra invoke, 1 -> 64 (µs)", None),
    ("rss_growth_mb_1000_traces", "RSS growth over 1,000 traces (MB)", None),
    ("rss_growth_mb_12_states", "RSS growth, 1,000 traces x 12 saved states (MB)", None),
    ("tensors_kept_alive", "saved tensors alive after the user dropped them", 0),
    ("thread_growth_1000_traces", "thread growth over 1,000 traces", 0),
    ("gen_tiny_us_per_step", "generate 20 tokens, tiny model: overhead per step (µs)", None),
    ("gen_tiny_ratio", "generate 20 tokens, tiny model (traced/plain)", None),
    ("gen_gpt2_small_ratio", "generate 20 tokens, GPT-2-small (traced/plain)", 1.01),
    ("gen100_us_per_step", "generate 100 tokens, tiny model (vocab 512): overhead per step (µs)", None),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="python of a venv with the public nnsight installed")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--only", help="comma-separated case functions to run (e.g. small_cases,cold_case)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.quick, args.no_generate, args.only.split(",") if args.only else None)))
        return
    flags = ["--worker"] + (["--quick"] if args.quick else []) + (["--no-generate"] if args.no_generate else [])
    flags += ["--only", args.only] if args.only else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ours = _run(sys.executable, flags, env)
    theirs = _run(args.reference, flags, {**env, "PYTHONPATH": ""}, outside=True) if args.reference else None
    width = max(len(label) for _, label, _ in ROWS)
    header = f"{'case':<{width}}  {'ours':>9}" + (f"  {'reference':>10}  {'ref/ours':>8}" if theirs else "") + "  target"
    print(header)
    print("-" * len(header))
    for key, label, target in ROWS:
        if key not in ours:
            continue
        line = f"{label:<{width}}  {ours[key]:>9.3f}"
        if theirs:
            ref = theirs.get(key)
            ratio = f"{ref / ours[key]:>8.2f}" if ref is not None and ours[key] > 0 else f"{'':>8}"
            line += f"  {ref:>10.3f}  {ratio}" if ref is not None else f"  {'n/a':>10}  {'':>8}"
        line += f"  {'≤ ' + str(target) if target is not None else ''}"
        print(line)


def _run(python, flags, env, outside=False):
    # The reference runs from a neutral folder so it imports its own nnsight, not this checkout's.
    cwd = tempfile.gettempdir() if outside else str(HERE.parent)
    if not outside:
        env = {**env, "PYTHONPATH": str(HERE.parent / "src")}
    done = subprocess.run(
        [python, str(pathlib.Path(__file__).resolve()), *flags], env=env, cwd=cwd, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"benchmark worker failed under {python}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
