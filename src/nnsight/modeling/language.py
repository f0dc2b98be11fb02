"""``LanguageModel``: Hugging Face causal language models, with tokenisation, padding and generation.

    from nnsight import LanguageModel
    model = LanguageModel("smollm2-135m")                 # offline demo model, loads lazily
    model = LanguageModel(hf_model, tokenizer=tok)         # a model you already built
    with model.trace("The Eiffel Tower is in the city of"):
        logits = model.lm_head.output.save()
    with model.generate("Hello", max_new_tokens=5) as tracer:
        with tracer.iter[:]:
            ...
        tokens = model.generator.output.save()

Options:
    model           a repo id / local folder, "smollm2-135m", or a built ``PreTrainedModel``
    tokenizer       a tokenizer to use (never modified); default: loaded beside the model
    automodel       the auto class used to load (default ``AutoModelForCausalLM``)
    dispatch        load the weights now (default: on the first trace; until then the
                    model lives on the meta device, so printing and scanning are instant)
    padding_side    "left" (default) or "right": where invokes of different lengths are padded
    **kwargs        passed to ``from_pretrained`` (device_map, dtype/torch_dtype, revision, ...)

Padding never changes results: every batch gets an attention mask and position
ids counted from each row's first real token.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch

from ..tracing.envoy import Envoy
from ..tracing.errors import NNsightError
from ..tracing.interleaver import current_mediator
from ..tracing.tracer import Tracer
from .base import NNsight

_INPUT_KEYS = ("input_ids", "attention_mask")


class GenerateTracer(Tracer):
    """``with model.generate(...)``: the block runs across every forward of ``generate``."""

    def _run(self, interleaver, args, kwargs):
        model = self.model
        return interleaver.run(lambda: model._generate(args, kwargs, self._run_kwargs), steps_from=model)


class LanguageModel(NNsight):
    """A Hugging Face causal LM behind the nnsight API (see module docstring)."""

    def __init__(
        self,
        model,
        tokenizer=None,
        automodel=None,
        dispatch: bool = False,
        padding_side: str = "left",
        remote: bool = False,
        **kwargs,
    ):
        import transformers

        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        automodel = automodel or transformers.AutoModelForCausalLM
        if isinstance(automodel, str):
            automodel = getattr(transformers, automodel)
        source = None
        if remote and isinstance(model, str):
            # Built on meta from the config the server reports; no local weights are needed.
            from ..remote.client import fetch_model

            config, served_tokenizer = fetch_model(model)
            with torch.device("meta"):
                module = automodel.from_config(config)
            tokenizer = tokenizer if tokenizer is not None else served_tokenizer
            dispatch = False
        elif isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            source = _resolve(str(model))
            if tokenizer is None:
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    source, **{k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code")}
                )
            if dispatch:
                module = automodel.from_pretrained(source, **kwargs)
            else:
                config = transformers.AutoConfig.from_pretrained(
                    source, **{k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code")}
                )
                with torch.device("meta"):
                    module = automodel.from_config(config)
        else:
            module = model
        super().__init__(module)
        module.eval()
        _warn_block_outputs(transformers.__version__)
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "_source", source)
        object.__setattr__(self, "_automodel", automodel)
        object.__setattr__(self, "_load_kwargs", kwargs)
        object.__setattr__(self, "_dispatched", (source is None and not remote) or dispatch)
        object.__setattr__(self, "_remote_name", str(model) if isinstance(model, (str, bytes)) else None)
        object.__setattr__(self, "padding_side", padding_side)
        object.__setattr__(self, "generator", GeneratorEnvoy())
        object.__setattr__(self, "_takes_position_ids", None)

    @property
    def config(self):
        return self._module.config

    # -- loading ---------------------------------------------------------------

    def dispatch(self):
        """Load the real weights now (normally done by the first trace or generate)."""
        if self._dispatched:
            return self
        if self._source is None:
            raise NNsightError(
                "this LanguageModel was built from a server's config (remote=True) and has no local weights: "
                "use remote=True on trace/generate/session"
            )
        real = self._automodel.from_pretrained(self._source, **self._load_kwargs)
        real.eval()
        _rebind(self, real)
        object.__setattr__(self, "_dispatched", True)
        object.__setattr__(self, "_order", None)
        return self

    def trace(self, *inputs, remote: bool = False, blocking: bool = True, **kwargs) -> Tracer:
        """A context that runs the model once on ``inputs`` with the block's code alongside."""
        return self._context(Tracer, "trace", inputs, kwargs, remote, blocking)

    def generate(self, *inputs, remote: bool = False, blocking: bool = True, **kwargs) -> GenerateTracer:
        """A context that runs ``model.generate(...)`` with the block over every step."""
        return self._context(GenerateTracer, "generate", inputs, kwargs, remote, blocking)

    def scan(self, *inputs, **kwargs):
        """Shapes without computation; does not load the weights."""
        from ..tracing.scan import ScanTracer

        return self._context(ScanTracer, "scan", inputs, kwargs, remote=False, blocking=True, load=False)

    def _context(self, tracer_class, kind, inputs, kwargs, remote, blocking, load=True):
        if remote:
            from ..remote.client import remote_block

            return remote_block(self, kind, inputs, kwargs, blocking, remote)
        if load:
            self.dispatch()
        input_kwargs, run_kwargs = _split(kwargs)
        return tracer_class(self, inputs, input_kwargs, run_kwargs)

    # -- inputs ----------------------------------------------------------------

    def _prepare_input(self, *inputs, **kwargs):
        rows = []
        if "input_ids" in kwargs:
            rows += _rows_from_ids(kwargs.pop("input_ids"), kwargs.pop("attention_mask", None))
        for value in inputs:
            rows += self._rows(value)
        if not rows:
            raise NNsightError("a LanguageModel invoke needs text, token ids or input_ids")
        return (rows,), kwargs, len(rows)

    def _rows(self, value):
        if isinstance(value, str):
            return [self._tokenize(value)]
        if isinstance(value, Mapping) and "input_ids" in value:
            return _rows_from_ids(value["input_ids"], value.get("attention_mask"))
        if isinstance(value, torch.Tensor):
            return _rows_from_ids(value, None)
        if isinstance(value, (list, tuple)):
            if not value:
                raise NNsightError("an empty list is not a valid LanguageModel input")
            if all(isinstance(v, str) for v in value):
                return [self._tokenize(v) for v in value]
            if all(isinstance(v, int) for v in value):
                return [(list(value), [1] * len(value))]
            rows = []
            for v in value:
                rows += self._rows(v)
            return rows
        raise TypeError(f"cannot use a {type(value).__name__} as LanguageModel input")

    def _tokenize(self, text):
        if self.tokenizer is None:
            raise NNsightError("this LanguageModel has no tokenizer: pass tokenizer=... or give token ids")
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return (list(ids), [1] * len(ids))

    def _batch(self, prepared, invokers):
        rows = [row for (row_list,), _ in prepared for row in row_list]
        kwargs = prepared[0][1]
        width = max(len(ids) for ids, _ in rows)
        pad = self._pad_id()
        all_ids, all_masks = [], []
        for ids, mask in rows:
            fill = width - len(ids)
            if self.padding_side == "left":
                all_ids.append([pad] * fill + ids)
                all_masks.append([0] * fill + mask)
            else:
                all_ids.append(ids + [pad] * fill)
                all_masks.append(mask + [0] * fill)
        device = self._device()
        input_ids = torch.tensor(all_ids, dtype=torch.long, device=device)
        attention_mask = torch.tensor(all_masks, dtype=torch.long, device=device)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **kwargs}
        return (), batch

    def _pad_id(self):
        tok = self.tokenizer
        for candidate in (
            getattr(tok, "pad_token_id", None),
            getattr(tok, "eos_token_id", None),
            getattr(self.config, "pad_token_id", None),
            getattr(self.config, "eos_token_id", None),
        ):
            if isinstance(candidate, list):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return int(candidate)
        return 0

    def _device(self):
        for param in self._module.parameters():
            # Inputs of a model not loaded yet stay real (scan moves them to meta itself).
            return torch.device("cpu") if param.is_meta else param.device
        return torch.device("cpu")

    # -- running -----------------------------------------------------------------

    def _run(self, args, kwargs):
        if self._takes_position_ids is None:
            takes = "position_ids" in inspect.signature(self._module.forward).parameters
            object.__setattr__(self, "_takes_position_ids", takes)
        if self._takes_position_ids and "position_ids" not in kwargs and "attention_mask" in kwargs:
            mask = kwargs["attention_mask"]
            kwargs = {**kwargs, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        return self._module(*args, **kwargs)

    def _scan_inputs(self, args, kwargs):
        # Fake and meta tensors have no values, and transformers looks at the mask's
        # values to pick its attention path; an all-ones mask says nothing, so drop it.
        mask = kwargs.get("attention_mask")
        if mask is not None and bool(mask.all()):
            kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        return args, kwargs

    def _generate(self, args, kwargs, run_kwargs):
        run_kwargs = dict(run_kwargs)
        if getattr(self.config, "pad_token_id", None) is None and "pad_token_id" not in run_kwargs:
            run_kwargs["pad_token_id"] = self._pad_id()
        return self._module.generate(*args, **kwargs, **run_kwargs)


class GeneratorEnvoy:
    """``model.generator.output``: the token ids ``generate`` returns (available after the last step)."""

    @property
    def output(self):
        mediator = current_mediator()
        if mediator is None:
            raise NNsightError("model.generator.output is only available inside `with model.generate(...)`")
        return mediator.wait_for_result()


_warned_versions = set()


def _warn_block_outputs(version: str):
    """Under transformers 5, decoder blocks return a tensor where 4.x returned a tuple."""
    if int(version.split(".")[0]) >= 5 and version not in _warned_versions:
        import warnings

        _warned_versions.add(version)
        warnings.warn(
            f"transformers {version}: decoder blocks (e.g. GPT-2's transformer.h[i]) return the "
            "hidden-states tensor itself, so `.output[0]` selects batch row 0 rather than the hidden "
            "states (as it did under 4.x and in nnsight's README). Use `.output` directly.",
            stacklevel=3,
        )


def _split(kwargs):
    inputs = {k: v for k, v in kwargs.items() if k in _INPUT_KEYS}
    rest = {k: v for k, v in kwargs.items() if k not in _INPUT_KEYS}
    return inputs, rest


def _rows_from_ids(ids, mask):
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if ids and isinstance(ids[0], int):
        ids = [ids]
    if mask is None:
        masks = [[1] * len(row) for row in ids]
    else:
        masks = mask.tolist() if isinstance(mask, torch.Tensor) else mask
        if masks and isinstance(masks[0], int):
            masks = [masks]
    return [(list(row), list(m)) for row, m in zip(ids, masks)]


def _resolve(name: str) -> str:
    from ..data.smollm2 import SMOLLM2_NAME, smollm2_dir

    if name == SMOLLM2_NAME:
        return str(smollm2_dir())
    return name


def _rebind(envoy: Envoy, module: torch.nn.Module):
    """Point ``envoy`` and every envoy already made below it at the modules of ``module``."""
    object.__setattr__(envoy, "_module", module)
    for name, child in list(envoy._children.items()):
        sub = module._modules.get(name)
        if sub is None:
            del envoy._children[name]
        else:
            _rebind(child, sub)
