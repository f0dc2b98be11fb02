"""What the server can serve: a model spec -> a loaded NNsight model and what clients need to mirror it.

    spec "smollm2-135m"        the offline SmolLM2 (converted once into $NNSIGHT_CACHE)
    spec "/path/to/hf-folder"  a Hugging Face folder (config, weights, tokenizer)
    spec "name=/path"          the same, served under ``name``
"""

from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json")
MAX_TOKENIZER_FILE = 32 << 20


def parse_spec(spec: str) -> tuple[str, str]:
    """``(served name, source)`` of a model spec."""
    if "=" in spec:
        name, source = spec.split("=", 1)
    else:
        name, source = spec, spec
        if os.sep in spec or os.path.isdir(spec):
            name = Path(spec.rstrip(os.sep)).name
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '-', '_' and '.'")
    return name, source


def load(source: str):
    """A dispatched LanguageModel for ``source`` (weights loaded, eval mode)."""

    from ..modeling.language import LanguageModel, _resolve

    model = LanguageModel(source, dispatch=True)
    folder = Path(_resolve(source))
    return model, folder


def describe(name: str, model, folder: Path) -> dict:
    """What ``GET /v1/models/{name}`` reports: enough for a client to build the model on meta."""
    return {"name": name, "kind": "language", "config": model.config.to_dict(), "tokenizer": _tokenizer_files(folder)}


def describe_folder(name: str, source: str) -> dict | None:
    """The same from a Hugging Face folder's files, without loading the model (None when ``source`` is no such folder)."""
    import json

    folder = Path(source)
    config = folder / "config.json"
    if not config.is_file() or config.stat().st_size > MAX_TOKENIZER_FILE:
        return None
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except ValueError:  # not JSON: the worker reports the real problem when it loads the model
        return None
    if not isinstance(values, dict) or "model_type" not in values:
        return None
    return {"name": name, "kind": "language", "config": values, "tokenizer": _tokenizer_files(folder)}


def _tokenizer_files(folder: Path) -> dict:
    files = {}
    for fname in TOKENIZER_FILES:
        path = folder / fname
        if path.is_file() and path.stat().st_size <= MAX_TOKENIZER_FILE:
            files[fname] = path.read_text(encoding="utf-8")
    return files
