"""The ``nnsight`` command.

    nnsight serve smollm2-135m --port 8000            serve models (name, HF folder, or name=folder)
    nnsight serve keys create --name alice            print a new API key (shown once; stored hashed)
    nnsight serve keys list                           ids, names, creation and revocation times
    nnsight serve keys revoke KEY_ID

The server listens on 127.0.0.1 unless --host says otherwise. Data (SQLite database,
results) lives in --data-dir (default $NNSIGHT_SERVER_DIR or ~/.local/share/nnsight-server).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _keys(argv):
    from .settings import default_data_dir
    from .store import KeyStore

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, default=None)
    parser = argparse.ArgumentParser(prog="nnsight serve keys", description="manage API keys of an nnsight server")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", parents=[common], help="create a key and print it (it is shown only once)")
    create.add_argument("--name", default="default")
    sub.add_parser("list", parents=[common], help="list keys")
    revoke = sub.add_parser("revoke", parents=[common], help="revoke a key by its id")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)
    store = KeyStore((args.data_dir or default_data_dir()) / "nnsight.db")
    if args.command == "create":
        key_id, key = store.create(args.name)
        print(f"key id: {key_id}", file=sys.stderr)
        print(key)
    elif args.command == "list":
        for row in store.list():
            state = "revoked " + time.strftime("%Y-%m-%d %H:%M", time.localtime(row["revoked"])) if row["revoked"] else "active"
            print(f"{row['id']}  {row['name']:<20} created {time.strftime('%Y-%m-%d %H:%M', time.localtime(row['created']))}  {state}")
    else:
        if not store.revoke(args.key_id):
            print(f"no active key with id {args.key_id!r}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id}")
    return 0


def _serve(argv):
    from .app import create_app
    from .settings import CO_BATCH_MODES, Settings, default_data_dir

    parser = argparse.ArgumentParser(prog="nnsight serve", description="serve models for remote=True requests")
    parser.add_argument("models", nargs="+", help="smollm2-135m, a Hugging Face folder, or name=folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--job-timeout", type=float, default=60.0, help="seconds a job may run")
    parser.add_argument("--memory-mb", type=int, default=None,
                        help="address-space limit of a worker in MiB (default: sized from the model and the machine; 0: none)")
    parser.add_argument("--max-body-mb", type=float, default=32)
    parser.add_argument("--max-tensor-mb", type=float, default=16)
    parser.add_argument("--max-result-mb", type=float, default=64)
    parser.add_argument("--rate-limit", type=int, default=120, help="job submissions per key per minute")
    parser.add_argument("--max-concurrent", type=int, default=4, help="queued + running jobs per key")
    parser.add_argument("--max-queue", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--weights-every", type=int, default=1, help="checksum the weights every N jobs (0: never)")
    parser.add_argument("--result-ttl", type=float, default=24 * 3600.0,
                        help="seconds a finished job (status, events, result) is kept")
    parser.add_argument("--co-batch", choices=CO_BATCH_MODES, default="any",
                        help="which queued trace (and generate) requests share a forward pass: any key, per key, or off")
    parser.add_argument("--max-batch", type=int, default=8, help="requests in one co-batched forward")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0,
                        help="how long a batch waits for more batch-mates once other requests are queued")
    parser.add_argument("--lazy", action="store_true", help="load each model on its first request")
    parser.add_argument("--memory-budget-gb", type=float, default=0.0,
                        help="with --lazy: unload least recently used models to keep weights under this (0: no budget)")
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                        help="run replicas as Ray actors: on the cluster at ADDRESS, or a local Ray instance")
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    parser.add_argument("--replicas", action="append", default=[], metavar="NAME=N", help="replicas of a model on Ray")
    parser.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs each Ray replica declares")
    parser.add_argument("--replica-memory-gb", type=float, default=0.0, help="memory each Ray replica declares")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="run workers without the namespace/seccomp layers")
    args = parser.parse_args(argv)
    replicas = {}
    for item in args.replicas:
        name, _, count = item.partition("=")
        if not count.isdigit() or int(count) < 1:
            parser.error(f"--replicas takes NAME=N with N >= 1, not {item!r}")
        replicas[name] = int(count)
    settings = Settings(
        models=args.models, data_dir=args.data_dir or default_data_dir(), job_timeout=args.job_timeout,
        memory_mb=args.memory_mb, max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_tensor_bytes=int(args.max_tensor_mb * (1 << 20)), max_result_bytes=int(args.max_result_mb * (1 << 20)),
        rate_limit=args.rate_limit, max_concurrent=args.max_concurrent, max_queue=args.max_queue,
        threads=args.threads, weights_every=args.weights_every, result_ttl=args.result_ttl, co_batch=args.co_batch,
        max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, lazy=args.lazy,
        memory_budget_gb=args.memory_budget_gb, isolate=args.isolate, ray=args.ray, ray_cpus=args.ray_cpus,
        replicas=replicas, replica_gpus=args.replica_gpus, replica_memory_gb=args.replica_memory_gb,
    )
    import uvicorn

    app = create_app(settings)
    print(f"nnsight serve: http://{args.host}:{args.port} (models: {', '.join(args.models)})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "serve":
        if argv[1:2] == ["keys"]:
            return _keys(argv[2:])
        return _serve(argv[1:])
    if argv[0] == "keys":
        return _keys(argv[1:])
    print(f"nnsight: unknown command {argv[0]!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
