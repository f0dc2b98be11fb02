"""``nnsight.ndif``: the remote service from Python (names as in the public nnsight client).

    import nnsight
    nnsight.register(mymodule)                 # send mymodule's code by value in remote blocks
    print(nnsight.status())                    # the server's models and their state
    nnsight.is_model_running("tiny-gpt2")      # True once that model's worker is ready
    nnsight.ndif.get_local_env()               # {"python_version": ..., "packages": {name: version | "local"}}
    print(nnsight.compare())                   # this Python's packages against the server's

The server is ``CONFIG.API.HOST`` (environment: ``NNSIGHT_HOST``, or ``NDIF_HOST``).
"""

from __future__ import annotations

import pkgutil
import sys
from importlib.metadata import distributions, packages_distributions

from .remote.byvalue import is_stdlib, register
from .tracing.deprecation import warn_deprecated


class Status(dict):
    """``{model name: {"state": "ready" | "loading" | ..., "kind": ...}}``; printing shows a table."""

    def __init__(self, models: dict, host: str, reachable: bool = True):
        super().__init__(models)
        self.host = host
        self.reachable = reachable

    def __str__(self):
        if not self.reachable:
            return f"nnsight server at {self.host}: not reachable"
        rows = [f"{'model':<32} {'state':<10} kind"] + [f"{n:<32} {v['state']:<10} {v.get('kind', '')}" for n, v in self.items()]
        return f"nnsight server at {self.host}\n" + "\n".join(rows)


def status(raw: bool = False):
    """The served models and their state (an empty ``Status`` when the server cannot be reached).

    raw   return the server's own answers (``{"health": ..., "models": [...]}``) instead
    """
    from .remote.client import fetch_status, server_host, unreachable_errors

    try:
        health, models = fetch_status()
    except unreachable_errors():
        print(f"nnsight: the server at {server_host()} is not reachable", file=sys.stderr)
        return {} if raw else Status({}, server_host(), reachable=False)
    if raw:
        return {"health": health, "models": models}
    kinds = {m["name"]: m.get("kind") for m in models}
    states = health.get("models", {})
    return Status({name: {"state": state, "kind": kinds.get(name)} for name, state in states.items()}, server_host())


def ndif_status(raw: bool = False):
    """Deprecated: the older name of ``nnsight.status(raw)``, which it returns."""
    warn_deprecated("nnsight.ndif_status()", "nnsight.status()")
    return status(raw)


def is_model_running(name: str) -> bool:
    """Whether the server serves ``name`` and its worker is ready (False when the server is unreachable)."""
    return status().get(name, {}).get("state") == "ready"


def get_local_env() -> dict:
    """This Python's version and packages by import name; the user's own modules are marked ``"local"``.

    Standard-library modules are never listed as local.
    """
    imports: dict[str, list[str]] = {}
    for import_name, dists in packages_distributions().items():
        for dist in dists:
            imports.setdefault(dist, []).append(import_name)
    packages: dict[str, str] = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        for import_name in imports.get(name) or [name]:
            packages[import_name] = dist.version
    installed = tuple(p for p in sys.path if "site-packages" in p or "dist-packages" in p)
    for finder, module_name, _ in pkgutil.iter_modules():
        if module_name in packages or module_name.startswith("_") or is_stdlib(module_name):
            continue
        path = getattr(finder, "path", None)
        if isinstance(path, str) and not path.startswith(installed) and not path.startswith(sys.base_prefix):
            packages[module_name] = "local"
    return {"python_version": sys.version, "packages": packages}


# Packages whose versions decide what a traced block computes or how it is sent.
CRITICAL_PACKAGES = frozenset({"torch", "transformers", "nnsight", "numpy", "accelerate", "safetensors", "tokenizers"})


class EnvComparison:
    """This Python's environment against the server's (``print`` it for a table).

        comparison = nnsight.compare()
        comparison.python_matches        # same major.minor Python
        comparison.mismatches            # {package: {"local", "remote", "match", "critical"}} that differ
        comparison.critical_mismatches   # those of CRITICAL_PACKAGES

    Packages only one side has are listed as ``None`` on the other; the user's own
    ("local") modules are left out, since they travel with the request by value.
    """

    def __init__(self, local_env: dict, remote_env: dict):
        self.local_python = local_env["python_version"].split()[0]
        self.remote_python = remote_env["python_version"].split()[0]
        local = {k: v for k, v in local_env["packages"].items() if v != "local"}
        remote = dict(remote_env["packages"])
        self.packages = {
            name: {"local": local.get(name), "remote": remote.get(name), "match": local.get(name) == remote.get(name),
                   "critical": name.lower() in CRITICAL_PACKAGES}
            for name in sorted(set(local) | set(remote))
        }

    @property
    def python_matches(self) -> bool:
        return self.local_python.split(".")[:2] == self.remote_python.split(".")[:2]

    @property
    def mismatches(self) -> dict:
        return {name: row for name, row in self.packages.items() if not row["match"]}

    @property
    def critical_mismatches(self) -> dict:
        return {name: row for name, row in self.mismatches.items() if row["critical"]}

    def __str__(self):
        rows = [f"{'package':<28} {'local':<16} {'remote':<16}", f"{'python':<28} {self.local_python:<16} {self.remote_python:<16}"]
        for name, row in self.packages.items():
            if row["critical"] or not row["match"]:
                mark = "" if row["match"] else ("  <- differs (critical)" if row["critical"] else "  <- differs")
                rows.append(f"{name:<28} {str(row['local']):<16} {str(row['remote']):<16}{mark}")
        return "\n".join(rows)

    def __repr__(self):
        return f"EnvComparison({len(self.mismatches)} mismatches, {len(self.critical_mismatches)} critical)"


def get_remote_env() -> dict:
    """The server's ``{"python_version": ..., "packages": {...}}`` (``GET /v1/env``)."""
    from .remote.client import fetch_env

    return fetch_env()


def compare() -> EnvComparison:
    """This Python's packages against the server's: ``print(nnsight.compare())``."""
    return EnvComparison(get_local_env(), get_remote_env())


__all__ = ["register", "status", "is_model_running", "get_local_env", "get_remote_env", "compare", "EnvComparison",
           "Status"]
