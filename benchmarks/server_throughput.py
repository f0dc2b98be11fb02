"""Throughput and latency of the real server (``nnsight serve`` in a subprocess), measured in one run.

    python benchmarks/server_throughput.py                 # tiny + GPT-2-small-sized + SmolLM2, 1/4/16 clients
    python benchmarks/server_throughput.py --quick         # fewer requests, tiny + GPT-2-small-sized only
    python benchmarks/server_throughput.py --models tiny --clients 1,16 --requests 48

For every model and co-batching mode (``--co-batch any`` and ``off``) a fresh server is
started on 127.0.0.1; 1, 4 and 16 client threads each submit the typical request (save
two layers' outputs, zero one MLP), follow it over server-sent events and fetch the
result. Reported: requests/s, p50/p95 submit -> result latency, mean forward batch.

``--overhead`` (on by default) then runs one client through the project's own client
(``LanguageModel(name, remote=True)``) on the 2-layer d=64 GPT-2 and breaks the time down
from the server's /metrics: HTTP + client, queue, sandbox check, IPC, execution beyond
the forward pass (the same block run locally), integrity check, result storage.
Options:
    --models      comma list of tiny, gpt2-small, smollm2
    --clients     comma list of concurrent client counts
    --requests    requests per (model, mode, clients) cell (default: max(24, 3 x clients))
    --quick       fewer requests; skip SmolLM2
    --no-overhead skip the per-request breakdown
    --json PATH   also write the raw figures
    --modes       co-batching modes to run (default off,any)
    --breakdown   per cell, where a request's time went (server metrics); plain torch forwards at batch 1/4/8/16
    --batch-wait-ms MS  passed to the servers
    --weights-every N   passed to the servers (default 50; a full checksum of GPT-2-small's weights costs ~0.4 s)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "gpt2-tokenizer"
NNSIGHT = [sys.executable, "-m", "nnsight.server.cli"]
PROMPT = "The quick brown fox jumps over the lazy dog"

BODIES = {  # save two layers' outputs, zero one MLP
    "gpt2": "    model.transformer.h[0].mlp.output[:] = 0\n    a = model.transformer.h[0].output.save()\n"
            "    b = model.transformer.h[{last}].output.save()\n",
    "llama": "    model.model.layers[0].mlp.output[:] = 0\n    a = model.model.layers[0].output.save()\n"
             "    b = model.model.layers[{last}].output.save()\n",
}


def make_gpt2(folder, n_layer, n_embd, n_head):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=1024, vocab_size=50257,
                                     attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder, safe_serialization=True)
    for name in os.listdir(TOKENIZER):
        shutil.copy(TOKENIZER / name, folder / name)
    return folder


def models_wanted(names, root):
    out = {}
    for name in names:
        if name == "tiny":
            out[name] = (f"tiny={make_gpt2(root / 'tiny', 2, 64, 4)}", "gpt2", 1)
        elif name == "gpt2-small":
            out[name] = (f"gpt2-small={make_gpt2(root / 'gpt2-small', 12, 768, 12)}", "gpt2", 11)
        elif name == "smollm2":
            out[name] = ("smollm2-135m", "llama", 29)
        else:
            raise SystemExit(f"unknown model {name!r}")
    return out


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, spec, data, extra):
        import requests

        env = {**os.environ, "OMP_NUM_THREADS": "1", "NNSIGHT_SERVER_DIR": str(data)}
        data.mkdir(parents=True, exist_ok=True)
        self.key = subprocess.run(NNSIGHT + ["serve", "keys", "create", "--data-dir", str(data)], capture_output=True,
                                  text=True, check=True, env=env).stdout.strip()
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(data / "server.log", "wb")
        self.proc = subprocess.Popen(NNSIGHT + ["serve", spec, "--port", str(port), "--data-dir", str(data), *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((data / "server.log").read_text())
            try:
                if requests.get(self.url + "/health", timeout=2).json()["status"] == "ok":
                    return
            except (OSError, ValueError, KeyError, requests.RequestException):
                pass
            time.sleep(0.25)
        raise RuntimeError("the server did not start")

    def metrics(self):
        import requests

        out = {}
        for line in requests.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
        return out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def one_request(session, server, model, body):
    """Submit, follow the events to the end, fetch the result: the client protocol, timed."""
    h = {"X-API-Key": server.key}
    req = {"model": model, "kind": "trace", "source": body, "body_lineno": 2, "inputs": [PROMPT],
           "variables": {"model": {"$t": "envoy", "path": "model"}}}
    start = time.perf_counter()
    r = session.post(server.url + "/v1/jobs", json=req, headers=h, timeout=60)
    r.raise_for_status()
    job = r.json()["id"]
    status = None
    with session.get(f"{server.url}/v1/jobs/{job}/events", headers=h, stream=True, timeout=120) as events:
        for line in events.iter_lines(decode_unicode=True):
            if line.startswith("data:"):
                status = json.loads(line[5:]).get("status") or status
                if status in ("completed", "error", "cancelled"):
                    break
    if status != "completed":
        raise RuntimeError(f"job {job} ended {status}")
    session.get(f"{server.url}/v1/jobs/{job}/result", headers=h, timeout=60).raise_for_status()
    return time.perf_counter() - start


def run_cell(server, model, body, clients, total):
    import requests

    sessions = [requests.Session() for _ in range(clients)]
    one_request(sessions[0], server, model, body)  # warm up
    before = server.metrics()
    per_client = [total // clients + (1 if i < total % clients else 0) for i in range(clients)]

    def client(i):
        return [one_request(sessions[i], server, model, body) for _ in range(per_client[i])]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = [t for part in pool.map(client, range(clients)) for t in part]
    wall = time.perf_counter() - start
    after = server.metrics()
    forwards = after.get("nnsight_forward_batch_size_count", 0) - before.get("nnsight_forward_batch_size_count", 0)
    rows = after.get("nnsight_forward_batch_size_sum", 0) - before.get("nnsight_forward_batch_size_sum", 0)
    latencies.sort()

    def mean_ms(metric):
        count = after.get(metric + "_count", 0) - before.get(metric + "_count", 0)
        return 1000 * (after.get(metric + "_sum", 0) - before.get(metric + "_sum", 0)) / count if count else 0.0

    p50 = 1000 * statistics.median(latencies)
    # Where a request's time went (means over the cell, from the server's /metrics). "run" is the
    # time of the whole forward group the job was in (decode, sandbox, shared forward, encode).
    parts = {part: mean_ms(metric) for part, metric in BREAKDOWN.items()}
    parts["HTTP, SSE and client threads (rest)"] = 1000 * statistics.mean(latencies) - sum(parts.values())
    return {"clients": clients, "requests": len(latencies), "rps": len(latencies) / wall,
            "p50_ms": p50, "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))],
            "mean_ms": 1000 * statistics.mean(latencies), "mean_batch": rows / forwards if forwards else 0.0,
            "parts_ms": parts}


BREAKDOWN = {  # part of a request's time -> the server metric that measures it
    "sandbox check (HTTP handler)": "nnsight_sandbox_check_seconds",
    "queue wait (batch window + previous batches)": "nnsight_queue_wait_seconds",
    "IPC to/from the worker": "nnsight_job_ipc_seconds",
    "waiting in the worker for earlier groups": "nnsight_job_worker_wait_seconds",
    "its forward group (decode, sandbox, forward, encode)": "nnsight_job_run_seconds",
    "integrity check + gc after the group": "nnsight_job_check_seconds",
    "result storage": "nnsight_result_store_seconds",
}


def plain_forwards(folder, batches=(1, 4, 8, 16), n=20):
    """Median ms of a plain torch forward (no nnsight) over ``batch`` copies of the prompt, torch on 1 thread."""
    import torch
    import transformers

    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    out = {}
    for batch in batches:
        ids = tok([PROMPT] * batch, return_tensors="pt")
        times = []
        with torch.inference_mode():
            for _ in range(3):
                model(**ids)
            for _ in range(n):
                t = time.perf_counter()
                model(**ids)
                times.append(time.perf_counter() - t)
        out[batch] = 1000 * statistics.median(times)
    return out


def overhead(spec, root, n=40):
    """One client through the project's client; where a request's time goes (the block is BODIES["gpt2"], last=1)."""
    import torch

    from nnsight import CONFIG, LanguageModel

    torch.set_num_threads(1)
    name, folder = spec.split("=", 1)
    server = Server(spec, root / "data-overhead", ["--rate-limit", "100000"])
    try:
        os.environ["NNSIGHT_CONFIG_DIR"] = str(root / "config")
        CONFIG.load()
        CONFIG.API.HOST, CONFIG.API.APIKEY = server.url, server.key
        CONFIG.APP.REMOTE_LOGGING = False
        remote = LanguageModel(name, remote=True)
        local = LanguageModel(folder, dispatch=True)

        def remote_once(model):
            with model.trace(PROMPT, remote=True):
                model.transformer.h[0].mlp.output[:] = 0
                a = model.transformer.h[0].output.save()
                b = model.transformer.h[1].output.save()
            return a, b

        def local_once(model):
            with model.trace(PROMPT):
                model.transformer.h[0].mlp.output[:] = 0
                a = model.transformer.h[0].output.save()
                b = model.transformer.h[1].output.save()
            return a, b

        def plain_forward(model):
            ids = model.tokenizer(PROMPT, return_tensors="pt")
            with torch.inference_mode():
                model._module(**ids)

        for _ in range(3):
            remote_once(remote), local_once(local)
        before = server.metrics()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            remote_once(remote)
            times.append(time.perf_counter() - t)
        after = server.metrics()
        local_times, forward_times = [], []
        for _ in range(n):
            t = time.perf_counter()
            local_once(local)
            local_times.append(time.perf_counter() - t)
            t = time.perf_counter()
            plain_forward(local)
            forward_times.append(time.perf_counter() - t)
    finally:
        server.stop()

    def mean(metric):
        count = after.get(metric + "_count", 0) - before.get(metric + "_count", 0)
        return 1000 * (after.get(metric + "_sum", 0) - before.get(metric + "_sum", 0)) / count if count else 0.0

    parts = {
        "sandbox check (HTTP handler)": mean("nnsight_sandbox_check_seconds"),
        "queue wait": mean("nnsight_queue_wait_seconds"),
        "IPC to/from the worker": mean("nnsight_job_ipc_seconds"),
        "execution in the worker (decode, sandbox, trace, encode)": mean("nnsight_job_run_seconds"),
        "integrity check + gc after the job": mean("nnsight_job_check_seconds"),
        "result storage": mean("nnsight_result_store_seconds"),
    }
    p50 = 1000 * statistics.median(times)
    forward = 1000 * statistics.median(forward_times)
    local_trace = 1000 * statistics.median(local_times)
    server_side = sum(parts.values())
    parts["HTTP + client (rest of submit -> result)"] = p50 - server_side
    return {"p50_ms": p50, "forward_ms": forward, "local_trace_ms": local_trace, "parts_ms": parts,
            "server_overhead_beyond_forward_ms": server_side - forward}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-overhead", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--modes", default="off,any", help="co-batching modes to run (comma list)")
    parser.add_argument("--breakdown", action="store_true",
                        help="per cell, where a request's time went; and plain torch forwards at batch 1/4/8/16")
    parser.add_argument("--batch-wait-ms", default=None, help="passed to the servers (default: the server's)")
    parser.add_argument("--weights-every", type=int, default=50,
                        help="the servers' weights checksum interval in jobs (the server's default is 1)")
    args = parser.parse_args()
    names = (args.models or ("tiny,gpt2-small" if args.quick else "tiny,gpt2-small,smollm2")).split(",")
    clients = [int(c) for c in args.clients.split(",")]
    root = pathlib.Path(tempfile.mkdtemp(prefix="nnsight-bench-"))
    results = {"cells": [], "overhead": None}
    try:
        specs = models_wanted(names, root)
        for name, (spec, family, last) in specs.items():
            body = BODIES[family].format(last=last)
            for mode in args.modes.split(","):
                server = Server(spec, root / f"data-{name}-{mode}",
                                ["--co-batch", mode, "--max-batch", "16", "--rate-limit", "100000",
                                 "--max-concurrent", "64", "--job-timeout", "300", "--weights-every", str(args.weights_every),
                                 *(["--batch-wait-ms", args.batch_wait_ms] if args.batch_wait_ms is not None else [])])
                try:
                    for c in clients:
                        total = args.requests or (max(12, 2 * c) if args.quick else max(24, 3 * c))
                        cell = run_cell(server, spec.split("=")[0], body, c, total)
                        cell.update(model=name, co_batch=mode)
                        results["cells"].append(cell)
                        print(f"{name:<11} co-batch={mode:<4} clients={c:>2}: {cell['rps']:6.2f} req/s  "
                              f"p50 {cell['p50_ms']:7.1f} ms  p95 {cell['p95_ms']:7.1f} ms  batch {cell['mean_batch']:.1f}",
                              flush=True)
                        if args.breakdown:
                            print("    mean " + ", ".join(f"{part} {ms:.1f}" for part, ms in
                                                         [("total", cell["mean_ms"]), *cell["parts_ms"].items()]), flush=True)
                finally:
                    server.stop()
        if args.breakdown:
            for name, (spec, _, _) in specs.items():
                if "=" in spec:
                    forwards = results.setdefault("plain_forward_ms", {})[name] = plain_forwards(spec.split("=", 1)[1])
                    print(f"plain torch forward, {name}: " + ", ".join(f"batch {b} {ms:.1f} ms" for b, ms in forwards.items()))
        if not args.no_overhead:
            spec = specs["tiny"][0] if "tiny" in specs else models_wanted(["tiny"], root)["tiny"][0]
            results["overhead"] = oh = overhead(spec, root)
            print(f"\none client, project's client, 2-layer d=64 GPT-2: p50 {oh['p50_ms']:.1f} ms submit -> result; "
                  f"plain forward {oh['forward_ms']:.1f} ms, local trace {oh['local_trace_ms']:.1f} ms")
            for part, ms in oh["parts_ms"].items():
                print(f"  {part:<58} {ms:7.2f} ms")
            print(f"  server-side overhead beyond the forward pass: {oh['server_overhead_beyond_forward_ms']:.1f} ms")
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
