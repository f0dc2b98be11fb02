"""``LanguageModel``: Hugging Face causal language models, with tokenisation, padding and generation.

    from nnsight import LanguageModel
    model = LanguageModel("smollm2-135m")                 # offline demo model, loads lazily
    model = LanguageModel(hf_model, tokenizer=tok)         # a model you already built
    with model.trace("The Eiffel Tower is in the city of"):
        logits = model.lm_head.output.save()
    with model.generate("Hello", max_new_tokens=5) as tracer:
        for step in tracer.iter[:]:
            ...
        tokens = tracer.result.save()

Options:
    model           a repo id / local folder, "smollm2-135m", or a built ``PreTrainedModel``
    tokenizer       a tokenizer to use (never modified); default: loaded beside the model
                    and set to left padding (right for encoders and encoder-decoders; its pad
                    token, if missing, is its eos token)
    automodel       the auto class used to load (default ``AutoModelForCausalLM``)
    dispatch        load the weights now (default: on the first trace; until then the
                    model lives on the meta device, so printing and scanning are instant)
    padding_side    "left" or "right": where invokes of different lengths are padded, over
                    the tokenizer's own ``padding_side`` (which decides when this is not given)
    tokenizer_kwargs  passed to ``AutoTokenizer.from_pretrained`` (set as attributes on a
                    tokenizer you pass in, as nnsight 0.8.1 does)
    peft            a saved PEFT adapter folder to attach (loads the weights now); see
                    ``nnsight.modeling.adapters`` for ``load_adapter`` and ``adapter=``
    rename, envoys  module aliases and envoy classes (see ``NNsight``)
    **kwargs        passed to ``from_pretrained`` (device_map, dtype/torch_dtype, revision,
                    attn_implementation, trust_remote_code, ...); the ones that decide the
                    module tree (trust_remote_code, attn_implementation, dtype, revision) also
                    reach the config, the tokenizer and the meta build

Padding never changes results: every batch gets an attention mask and position
ids counted from each row's first real token.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Mapping

import torch

from ..tracing.deprecation import warn_deprecated
from ..tracing.envoy import Envoy
from ..tracing.errors import InvokeError, NNsightError
from ..tracing.interleaver import active_hook, current_mediator
from ..tracing.tracer import Tracer
from .adapters import AdapterMixin, with_adapter_option
from .invoke_ends import with_invoke_ends
from ..util import WrapperModule
from .base import NNsight, untraced

# Per-token fields an invoke may pass beside its ids, with the value that pads them and
# fills them in for an invoke that lacks them (position_ids: counted from its mask instead).
_ROW_FIELDS = {"token_type_ids": 0, "position_ids": 0, "labels": -100, "special_tokens_mask": 1,
               "global_attention_mask": 0}
# A decoder's fields have a width of their own: each row is padded on the right to the widest
# (whichever side the inputs are padded on), and every invoke must pass them (there is no default).
# decoder_input_ids pad with the pad token (None here).
_DECODER_FIELDS = {"decoder_input_ids": None, "decoder_attention_mask": 0, "decoder_inputs_embeds": 0.0}
# One value per row (question answering's span), concatenated; every invoke must pass them.
_EXAMPLE_FIELDS = ("start_positions", "end_positions")
_INPUT_KEYS = ("input_ids", "attention_mask", "inputs_embeds", *_ROW_FIELDS, *_DECODER_FIELDS, *_EXAMPLE_FIELDS)
# Loading options that also reach the config and the tokenizer (they choose the code and files).
_HUB_KWARGS = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only", "subfolder")
# Options that decide which modules the meta build has (device_map and the like mean nothing on meta).
_META_KWARGS = ("trust_remote_code", "attn_implementation", "torch_dtype", "dtype")
_DEFAULT = object()


class GenerateTracer(Tracer):
    """``with model.generate(...)``: the block runs across every forward of ``generate``."""

    # Whether each invoke ends at its own rows' end of sequence, as if run alone (the server's
    # co-batches, see modeling/invoke_ends.py). Off here: in nnsight 0.8.1 every invoke of a
    # local generate sees every step of the batch, and its rows of the whole output.
    invokes_end_alone = False

    def _run(self, interleaver, args, kwargs):
        model = self.model
        run_kwargs = self._run_kwargs
        if self.invokes_end_alone:
            run_kwargs = with_invoke_ends(model._module, interleaver, run_kwargs)
        return interleaver.run(lambda: model._generate(args, kwargs, run_kwargs), steps_from=model)


class LanguageModel(AdapterMixin, NNsight):
    """A Hugging Face causal LM behind the nnsight API (see module docstring)."""

    task = "text-generation"  # the pipeline task (TransformersModel sets its own)

    def __init__(
        self,
        model,
        tokenizer=None,
        automodel=None,
        dispatch: bool = False,
        padding_side: str | None = None,
        remote: bool = False,
        peft=None,
        tokenizer_kwargs: dict | None = None,
        rename: dict | None = None,
        envoys=_DEFAULT,
        **kwargs,
    ):
        import transformers

        _check_side(padding_side)
        if tokenizer_kwargs is not None and not isinstance(tokenizer_kwargs, Mapping):
            raise TypeError(f"tokenizer_kwargs must be a dict, not {type(tokenizer_kwargs).__name__}")
        tokenizer_kwargs = dict(tokenizer_kwargs or {})
        hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
        passed_tokenizer = tokenizer
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
            if tokenizer is None and served_tokenizer is not None:
                tokenizer = _own_tokenizer(served_tokenizer, padding_side, tokenizer_kwargs)
            dispatch = False
        elif isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            source = _resolve(str(model))
            if tokenizer is None:
                tokenizer = transformers.AutoTokenizer.from_pretrained(source, **{**hub, **tokenizer_kwargs})
                tokenizer = _own_tokenizer(tokenizer, padding_side, tokenizer_kwargs)
            if dispatch:
                module = automodel.from_pretrained(source, **kwargs)
            else:
                config = transformers.AutoConfig.from_pretrained(source, **hub)
                meta = {k: v for k, v in kwargs.items() if k in _META_KWARGS}
                with torch.device("meta"):
                    module = automodel.from_config(config, **meta)
        else:
            module = model
            # A model you built is used as it is; loading options mean nothing for it,
            # except the attention implementation, which can still be switched.
            attn = kwargs.get("attn_implementation")
            if attn is not None and getattr(getattr(module, "config", None), "_attn_implementation", attn) != attn:
                module.set_attn_implementation(attn)
        if tokenizer is not None and tokenizer is not passed_tokenizer and not (padding_side or tokenizer_kwargs.get("padding_side")):
            # One we loaded: left suits generating from a batch (a decoder-only model); encoders and
            # encoder-decoders read learned or relative positions from the start, so pad on the right (as 0.8.1).
            tokenizer.padding_side = "left" if _decoder_only(module) else "right"
        if passed_tokenizer is not None:
            for key, value in tokenizer_kwargs.items():  # a tokenizer you passed: set as asked
                setattr(passed_tokenizer, key, value)
        super().__init__(module, rename=rename, **({} if envoys is _DEFAULT else {"envoys": envoys}))
        module.eval()
        _warn_block_outputs(transformers.__version__)
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "_weights", source)
        object.__setattr__(self, "_automodel", automodel)
        object.__setattr__(self, "_load_kwargs", kwargs)
        object.__setattr__(self, "_dispatched", (source is None and not remote) or dispatch)
        object.__setattr__(self, "_remote_name", str(model) if isinstance(model, (str, bytes)) else None)
        object.__setattr__(self, "_padding_option", padding_side)
        object.__setattr__(self, "generator", GeneratorEnvoy(_Generator(), "model.generator", self, self))
        object.__setattr__(self, "_takes_position_ids", None)
        if peft is not None:
            self.load_adapter(peft)

    @property
    def config(self):
        return self._module.config

    @property
    def dispatched(self) -> bool:
        """Whether the real weights are loaded (False while the model lives on the meta device)."""
        return self._dispatched

    @property
    def padding_side(self) -> str:
        """Where invokes of different lengths are padded: the ``padding_side=`` option, else the tokenizer's."""
        if self._padding_option is not None:
            return self._padding_option
        return getattr(self.tokenizer, "padding_side", None) or "left"

    @padding_side.setter
    def padding_side(self, side):
        _check_side(side)
        object.__setattr__(self, "_padding_option", side)

    # -- loading ---------------------------------------------------------------

    def dispatch(self):
        """Load the real weights now (normally done by the first trace or generate)."""
        if self._dispatched:
            return self
        if self._weights is None:
            raise NNsightError(
                "this LanguageModel was built from a server's config (remote=True) and has no local weights: "
                "use remote=True on trace/generate/session"
            )
        real = self._automodel.from_pretrained(self._weights, **self._load_kwargs)
        real.eval()
        _rebind(self, real)
        object.__setattr__(self, "_dispatched", True)
        object.__setattr__(self, "_order", None)
        return self

    def trace(self, *inputs, remote: bool = False, blocking: bool = True, trace: bool = True, **kwargs) -> Tracer:
        """A context that runs the model once on ``inputs`` with the block's code alongside.

        ``trace=False``: no block; run the model now (with its persistent edits) and return its output.
        """
        if not trace:
            return untraced(self, remote, self._context(Tracer, "trace", inputs, kwargs, False, blocking))
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
        input_kwargs, run_kwargs = _split(kwargs, self._tokenizer_options())
        return tracer_class(self, inputs, input_kwargs, run_kwargs)

    # -- inputs ----------------------------------------------------------------

    def _prepare_input(self, *inputs, **kwargs):
        rows = []
        # Tokenizer options (truncation=, max_length=, add_special_tokens=, ...) apply to this invoke's text.
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in self._tokenizer_options()}
        kwargs = {k: _as_tensor(v) for k, v in kwargs.items()}
        fields = {k: kwargs.pop(k) for k in (*_ROW_FIELDS, *_DECODER_FIELDS, *_EXAMPLE_FIELDS)
                  if k in kwargs and _is_field(k, kwargs[k])}
        if "input_ids" not in kwargs and "attention_mask" in kwargs and len(inputs) == 1 and _is_ids(_as_tensor(inputs[0])):
            # model.trace(ids, attention_mask=mask): the mask belongs to those ids.
            kwargs["input_ids"], inputs = inputs[0], ()
        whole = _whole_input(inputs, kwargs)
        if whole is not None:
            return ([whole],), kwargs, len(whole["input_ids"])
        if "input_ids" in kwargs:
            rows += _rows_from_ids(kwargs.pop("input_ids"), kwargs.pop("attention_mask", None))
        elif isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
            rows += _rows_from_embeds(kwargs.pop("inputs_embeds"), kwargs.pop("attention_mask", None))
        for value in inputs:
            rows += self._rows(value, options)
        if not rows:
            raise InvokeError("a LanguageModel invoke needs text, token ids, input_ids or inputs_embeds")
        if any(row[0] is None for row in rows) and any(row[0] is not None for row in rows):
            raise InvokeError("an invoke passes both token ids and inputs_embeds: the model takes one or the other")
        if fields:
            rows = _with_fields(rows, fields)
        return (rows,), kwargs, len(rows)

    def _tokenizer_options(self) -> frozenset:
        """The keyword arguments the tokenizer's ``__call__`` takes besides the text (truncation, ...)."""
        tok = self.tokenizer
        if tok is None:
            return frozenset()
        cached = self.__dict__.get("_tokenizer_option_cache")
        if cached is None or cached[0] is not tok:
            try:
                params = inspect.signature(type(tok).__call__).parameters
            except (TypeError, ValueError):  # a callable without a signature Python can read
                params = {}
            names = frozenset(
                n for n, p in params.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in ("self", "text")
            ) - frozenset(_INPUT_KEYS)
            cached = (tok, names)
            object.__setattr__(self, "_tokenizer_option_cache", cached)
        return cached[1]

    def _rows(self, value, options=None):
        value = _as_tensor(value)
        if isinstance(value, str):
            return [self._tokenize(value, options)]
        if isinstance(value, Mapping) and ("input_ids" in value or "inputs_embeds" in value):
            value = {k: _as_tensor(v) for k, v in value.items()}
            if "input_ids" in value:
                rows = _rows_from_ids(value["input_ids"], value.get("attention_mask"))
            else:
                rows = _rows_from_embeds(value["inputs_embeds"], value.get("attention_mask"))
            fields = {k: value[k] for k in (*_ROW_FIELDS, *_DECODER_FIELDS, *_EXAMPLE_FIELDS) if value.get(k) is not None}
            return _with_fields(rows, fields) if fields else rows
        if isinstance(value, torch.Tensor):
            return _rows_from_ids(value, None)
        if isinstance(value, (list, tuple)):
            if not value:
                raise InvokeError("an empty list is not a valid LanguageModel input")
            if all(isinstance(v, str) for v in value):
                return [self._tokenize(v, options) for v in value]
            if all(isinstance(v, numbers.Integral) for v in value):
                return _rows_from_ids([int(v) for v in value], None)
            rows = []
            for v in value:
                rows += self._rows(v, options)
            return rows
        raise TypeError(f"cannot use a {type(value).__name__} as LanguageModel input")

    def _tokenize(self, text, options=None):
        if self.tokenizer is None:
            raise NNsightError("this LanguageModel has no tokenizer: pass tokenizer=... or give token ids")
        options = {k: v for k, v in (options or {}).items() if k != "return_tensors"}  # rows are lists here
        encoding = self.tokenizer(text, **{"add_special_tokens": True, **options})
        ids = encoding["input_ids"]
        row = _Row((list(ids), list(encoding.get("attention_mask") or [1] * len(ids))))
        row.fields = {}
        if options.get("text_pair") is not None and encoding.get("token_type_ids") is not None:
            row.fields["token_type_ids"] = list(encoding["token_type_ids"])  # which tokens are the pair's
        return row

    def _batch(self, prepared, invokers):
        rows = [row for (row_list,), _ in prepared for row in row_list]
        kwargs = _shared_kwargs([kw for _, kw in prepared])
        if any(isinstance(row, _Whole) for row in rows):
            if len(rows) != 1:
                raise InvokeError("token ids of more than two dimensions (e.g. multiple choice) are handed to the "
                                  "model whole, so they cannot share a batch with other invokes")
            return (), {**rows[0], **kwargs}
        width = max(len(mask) for _, mask in rows)
        embedded = rows[0][0] is None
        if embedded != all(ids is None for ids, _ in rows):
            raise InvokeError("some invokes pass token ids and others inputs_embeds: the model takes one or the other")
        pad = None
        if not embedded and any(len(ids) != width for ids, _ in rows):
            pad = self._pad_id()
            if pad is None:
                who = "the tokenizer" if self.tokenizer is not None else "the model's config (there is no tokenizer)"
                raise InvokeError(
                    f"these invokes' inputs have different lengths and must be padded, but {who} names no pad "
                    "token (nor an eos token to pad with), so they cannot be padded without a pad token: set "
                    "model.tokenizer.pad_token (or pass equal-length inputs)"
                )
        side = self.padding_side
        all_ids, all_masks = [], []
        for ids, mask in rows:
            fill = width - len(mask)
            if side == "left":
                all_ids.append(None if embedded else [pad] * fill + ids)
                all_masks.append([0] * fill + mask)
            else:
                all_ids.append(None if embedded else ids + [pad] * fill)
                all_masks.append(mask + [0] * fill)
        device = self._device()
        attention_mask = torch.tensor(all_masks, dtype=torch.long, device=device)
        run_kwargs = invokers[0].tracer._run_kwargs if invokers and hasattr(invokers[0], "tracer") else {}
        if pad is None and ("past_key_values" in kwargs or "past_key_values" in run_kwargs) and all(getattr(row, "assumed", False) for row in rows):
            # Continuing a cache: a mask would have to cover its past tokens too, so none is made up.
            attention_mask = None
        if embedded:
            batch = {"inputs_embeds": _pad_tensors([row.fields["inputs_embeds"] for row in rows], width, side, device),
                     "attention_mask": attention_mask, **kwargs}
        else:
            batch = {"input_ids": torch.tensor(all_ids, dtype=torch.long, device=device),
                     "attention_mask": attention_mask, **kwargs}
        for name in _ROW_FIELDS:
            if any(name in getattr(row, "fields", {}) for row in rows):
                batch[name] = _batch_field(name, rows, all_masks, width, side, device)
        for name in (*_DECODER_FIELDS, *_EXAMPLE_FIELDS):
            having = sum(name in getattr(row, "fields", {}) for row in rows)
            if not having:
                continue
            if having != len(rows):
                raise InvokeError(
                    f"{having} of {len(rows)} rows have `{name}`: it has no default to fill in, so every "
                    "invoke must pass it (or none)"
                )
            values = [row.fields[name] for row in rows]
            if name in _EXAMPLE_FIELDS:
                batch[name] = torch.tensor(values, dtype=torch.long, device=device)
            elif isinstance(values[0], torch.Tensor):  # decoder_inputs_embeds
                batch[name] = _pad_tensors(values, max(len(v) for v in values), "right", device)
            else:
                fill = _DECODER_FIELDS[name]
                if fill is None:
                    fill = self._decoder_pad_id()
                own = max(len(v) for v in values)
                batch[name] = torch.tensor([v + [fill] * (own - len(v)) for v in values], dtype=torch.long, device=device)
        if attention_mask is None:
            del batch["attention_mask"]
        return (), batch

    def _decoder_pad_id(self):
        pad = getattr(self.config, "pad_token_id", None)
        if pad is None:
            pad = self._pad_id()
        if pad is None:
            raise InvokeError("`decoder_input_ids` of different lengths need a pad token: the config and the tokenizer name none")
        return int(pad)

    def _pad_id(self):
        """The tokenizer's pad token, else its eos token (as nnsight 0.8.1 pads); a model without a
        tokenizer (token ids only) uses its config's pad, else eos, token id. None when there is none."""
        tok = self.tokenizer
        if tok is not None:
            candidates = (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
        else:
            candidates = (getattr(self.config, "pad_token_id", None), getattr(self.config, "eos_token_id", None))
        for candidate in candidates:
            if isinstance(candidate, list):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return int(candidate)
        return None

    def _device(self):
        for param in self._module.parameters():
            # Inputs of a model not loaded yet stay real (scan moves them to meta itself).
            return torch.device("cpu") if param.is_meta else param.device
        return torch.device("cpu")

    # -- running -----------------------------------------------------------------

    @with_adapter_option
    def _run(self, args, kwargs):
        if self._takes_position_ids is None:
            takes = "position_ids" in inspect.signature(self._module.forward).parameters
            object.__setattr__(self, "_takes_position_ids", takes)
        if self._takes_position_ids and "position_ids" not in kwargs and "attention_mask" in kwargs:
            positions = _left_padded_positions(kwargs["attention_mask"], kwargs.get("input_ids"))
            if positions is not None:
                kwargs = {**kwargs, "position_ids": positions}
        return self._module(*args, **kwargs)

    def _scan_inputs(self, args, kwargs):
        # Fake and meta tensors have no values, and transformers looks at the mask's
        # values to pick its attention path; an all-ones mask says nothing, so drop it.
        mask = kwargs.get("attention_mask")
        if mask is not None and bool(mask.all()):
            kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
        return args, kwargs

    @with_adapter_option
    def _generate(self, args, kwargs, run_kwargs):
        run_kwargs = dict(run_kwargs)
        # Each step's new tokens pass through model.generator.streamer (readable per step),
        # then on to a streamer of the caller's own (TextIteratorStreamer, ...).
        # (transformers refuses streamers with beam search; there the streamer never runs.)
        beams = run_kwargs.get("num_beams", getattr(getattr(self._module, "generation_config", None), "num_beams", 1))
        if (beams or 1) == 1:
            run_kwargs["streamer"] = _StepStreamer(self.generator._module.streamer, run_kwargs.get("streamer"))
        if getattr(self.config, "pad_token_id", None) is None and "pad_token_id" not in run_kwargs:
            pad = self._pad_id()
            if pad is not None:  # otherwise generate's own rule (and warning) applies
                run_kwargs["pad_token_id"] = pad
        return self._module.generate(*args, **kwargs, **run_kwargs)


class _Generator(WrapperModule):
    """Stands for ``generate`` itself: ``.streamer`` is called with each step's new tokens."""

    def __init__(self):
        super().__init__()
        self.streamer = WrapperModule()


class _StepStreamer:
    """A Hugging Face streamer that hands tokens to ``model.generator.streamer``, then to ``user``."""

    def __init__(self, module, user=None):
        self.module = module
        self.user = user

    def put(self, value):
        if active_hook(self.module) is not None:  # a call no trace reads would only cost its dispatch
            self.module(value)
        if self.user is not None:
            self.user.put(value)

    def end(self):
        if self.user is not None:
            self.user.end()


class GeneratorEnvoy(Envoy):
    """``model.generator.streamer.output``: the tokens of the current step (inside ``tracer.iter``);
    ``model.generator.output`` (deprecated, as in nnsight 0.8.1: write ``tracer.result``): the token
    ids ``generate`` returns (available after the last step)."""

    @property
    def output(self):  # not a module value: the result of the whole run
        warn_deprecated("model.generator.output", "tracer.result")
        mediator = current_mediator()
        if mediator is None:
            raise NNsightError("model.generator.output is only available inside `with model.generate(...)`")
        return mediator.wait_for_result()

    def _assign_lazily(self, kind, make_value):
        if kind != "output":
            return super()._assign_lazily(kind, make_value)
        # nnsight 0.8.1 lets this write replace what generate returns; here it is refused with
        # a clear error rather than left to wait for a module call that never comes.
        warn_deprecated("model.generator.output", "tracer.result", stacklevel=3)
        raise NNsightError(
            "model.generator.output cannot be replaced: change the tokens after the trace "
            "(`tokens = tracer.result.save()`, then edit `tokens`), or edit the per-step "
            "model.generator.streamer.output / lm_head.output inside `tracer.iter`"
        )


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


def _decoder_only(module) -> bool:
    """A model that generates from its own prompt tokens (GPT-2, Llama): not an encoder, not an encoder-decoder."""
    config = getattr(module, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    can_generate = getattr(module, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else True


def _check_side(side):
    if side is not None and side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {side!r}")


def _own_tokenizer(tokenizer, padding_side, tokenizer_kwargs):
    """A tokenizer LanguageModel loaded itself: pads on the left unless told otherwise, and has a pad token."""
    tokenizer.padding_side = padding_side or tokenizer_kwargs.get("padding_side") or "left"
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _shared_kwargs(per_invoke):
    """The keyword arguments every invoke passes; they apply to the whole batch, so they must agree."""
    first = per_invoke[0]
    for number, kwargs in enumerate(per_invoke[1:], start=2):
        if kwargs.keys() != first.keys():
            raise InvokeError(
                f"invoke {number} passes keyword arguments {sorted(kwargs)} but invoke 1 passes {sorted(first)}: "
                "a LanguageModel runs all invokes as one batch, so every invoke must pass the same ones"
            )
        for key, value in kwargs.items():
            if not _same(value, first[key]):
                raise InvokeError(
                    f"invoke {number} passes {key}={_short(value)} but invoke 1 passes {key}={_short(first[key])}: "
                    "a LanguageModel runs all invokes as one batch, so keyword arguments must agree "
                    "(pass it once, to the trace)"
                )
    return first


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # objects whose == is not a truth value
        return a is b


def _short(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor of shape {tuple(value.shape)}>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _split(kwargs, tokenizer_options=frozenset()):
    """The trace's keyword arguments: (the input's and the tokenizer's, the run's)."""
    inputs = {k: v for k, v in kwargs.items() if k in _INPUT_KEYS or k in tokenizer_options}
    rest = {k: v for k, v in kwargs.items() if k not in inputs}
    return inputs, rest


def _as_tensor(value):
    """A numpy array (or numpy integer) as a tensor / int; anything else as it is."""
    if type(value).__module__ == "numpy":
        if getattr(value, "ndim", 0) == 0:
            return value.item()
        return torch.as_tensor(value)
    return value


def _rows_from_embeds(embeds, mask):
    """Rows of ``inputs_embeds`` ([rows, tokens, hidden], or one row [tokens, hidden]): ids None, the row in its fields."""
    if embeds.dim() == 2:
        embeds = embeds[None]
    if embeds.dim() != 3:
        raise InvokeError(f"inputs_embeds must be [rows, tokens, hidden] (or [tokens, hidden]), not of shape {tuple(embeds.shape)}")
    if mask is None:
        masks = [[1] * embeds.shape[1] for _ in range(embeds.shape[0])]
    else:
        masks = mask.tolist() if isinstance(mask, torch.Tensor) else mask
        if masks and isinstance(masks[0], int):
            masks = [masks]
    rows = []
    for i, m in enumerate(masks):
        row = _Row((None, [int(v) for v in m]))
        row.fields = {"inputs_embeds": embeds[i]}
        rows.append(row)
    return rows


def _pad_tensors(rows, width, side, device):
    """Rows of [tokens, hidden] stacked into [rows, width, hidden], padded with zeros on ``side``."""
    padded = []
    for row in rows:
        fill = row.new_zeros((width - row.shape[0], *row.shape[1:]))
        padded.append(torch.cat((fill, row) if side == "left" else (row, fill)))
    return torch.stack(padded).to(device)


def _is_field(name, value) -> bool:
    if name in _EXAMPLE_FIELDS or name == "labels":
        return _is_sequence(value) or isinstance(value, numbers.Integral)
    return _is_sequence(value)


def _rows_from_ids(ids, mask):
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if ids and isinstance(ids[0], int):
        ids = [ids]
    mask = _as_tensor(mask)
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        mask = mask.long()
    if mask is None:
        masks = [[1] * len(row) for row in ids]
    else:
        masks = mask.tolist() if isinstance(mask, torch.Tensor) else mask
        if masks and isinstance(masks[0], int):
            masks = [masks]
    rows = []
    for row, m in zip(ids, masks):
        new = _Row((list(row), list(m)))
        new.fields, new.assumed = {}, mask is None
        rows.append(new)
    return rows


class _Row(tuple):
    """One row ``(ids, mask)``, with the per-token fields its invoke passed (``.fields``);
    ``assumed``: the mask is all ones because none was given."""

    fields: dict
    assumed = False


class _Whole(dict):
    """An invoke's inputs handed to the model as they are (ids of more than two dimensions)."""


def _whole_input(inputs, kwargs):
    """The invoke's inputs as one ``_Whole`` when its ids have more than two dimensions, else None."""
    ids = kwargs.get("input_ids")
    source = kwargs
    if ids is None and len(inputs) == 1:
        source = inputs[0] if isinstance(inputs[0], Mapping) else {"input_ids": inputs[0]}
        ids = _as_tensor(source.get("input_ids"))
    if not isinstance(ids, torch.Tensor) or ids.dim() <= 2:
        return None
    whole = _Whole({k: _as_tensor(v) for k, v in source.items()})
    whole.setdefault("attention_mask", torch.ones_like(ids))
    if source is kwargs:
        for key in list(whole):
            kwargs.pop(key, None)
    return whole


def _left_padded_positions(mask, ids):
    """Position ids for a batch with left-padded rows, each counted from its first real token;
    other rows (right padding, gaps) keep the model's own 0, 1, 2, ... . None when no row is
    left-padded, or the mask also covers a cache's past tokens (its width is not the ids')."""
    if mask.dim() != 2 or (ids is not None and ids.shape[-1] != mask.shape[-1]):
        return None
    real = mask.long()
    counted = (real.cumsum(-1) - 1).clamp(min=0)
    # A left-padded row: zeros, then only ones, with at least one zero first.
    left = (real[:, 0] == 0) & (real.cummax(-1).values == real).all(-1) & real.any(-1)
    if not bool(left.any()):
        return None
    plain = torch.arange(mask.shape[-1], device=mask.device).expand_as(counted)
    return torch.where(left[:, None], counted, plain)


def _is_ids(value) -> bool:
    value = _as_tensor(value)
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point()
    return isinstance(value, list) and bool(value) and all(isinstance(v, (int, list)) for v in value)


def _flat(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() <= 1
    return not (isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, torch.Tensor)))


def _is_sequence(value) -> bool:
    return isinstance(value, (torch.Tensor, list, tuple))


def _as_rows(value, count: int, name: str):
    """``value`` (a tensor or nested list) as ``count`` lists, one per row; one row is shared by all."""
    if name == "decoder_inputs_embeds":
        rows = value if value.dim() == 3 else value[None]
        if len(rows) != count:
            raise InvokeError(f"`{name}` has {len(rows)} rows, but the input has {count}")
        return list(rows)
    if name in _EXAMPLE_FIELDS:
        per_row = value.reshape(-1).tolist() if isinstance(value, torch.Tensor) else value
        per_row = [per_row] if isinstance(per_row, int) else list(per_row)
        if len(per_row) != count:
            raise InvokeError(f"`{name}` has {len(per_row)} values, but the input has {count} rows (one each)")
        return per_row
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, int) and name == "labels":
        value = [value]
    if name == "labels" and isinstance(value, list) and value and isinstance(value[0], int) and count > 1:
        # Flat labels over several rows: one class per row (sequence classification).
        if len(value) != count:
            raise InvokeError(f"`labels` has {len(value)} rows, but `input_ids` has {count}")
        return value
    if not isinstance(value, list) or not value:
        raise InvokeError(f"`{name}` must be a tensor or list of per-token values, not {_short(value)}")
    if not isinstance(value[0], list):
        value = [value]
    if len(value) == 1 and count > 1:
        value = value * count
    if len(value) != count:
        raise InvokeError(f"`{name}` has {len(value)} rows, but `input_ids` has {count}")
    return value


def _with_fields(rows, fields):
    fields = {name: _as_tensor(value) for name, value in fields.items()}
    per_name = {name: _as_rows(value, len(rows), name) for name, value in fields.items()}
    labels = per_name.get("labels")
    if labels is not None and len(rows) == 1 and len(labels[0]) == 1 and len(rows[0][1]) != 1 and _flat(fields["labels"]):
        # One label beside one row of several tokens: that row's class.
        per_name["labels"] = [labels[0][0]]
    out = []
    for i, row in enumerate(rows):
        new = _Row(row[:2])
        new.fields = {**getattr(row, "fields", {}),
                      **{name: (v[i] if isinstance(v[i], (int, torch.Tensor)) else list(v[i])) for name, v in per_name.items()}}
        out.append(new)
    return out


def _batch_field(name, rows, masks, width, side, device):
    """One per-token field over the batch: each row padded like its ids (a field of another
    width than its row, such as seq2seq labels, is padded on the right to its own widest);
    a row without it gets its default."""
    fill = _ROW_FIELDS[name]
    carrying = [row for row in rows if name in getattr(row, "fields", {})]
    given = [row.fields[name] for row in carrying]
    if any(isinstance(v, int) for v in given):
        if not all(isinstance(v, int) for v in given):
            raise InvokeError(f"some invokes pass one `{name}` per row and others one per token")
        per_row = [getattr(row, "fields", {}).get(name, fill) for row in rows]
        return torch.tensor(per_row, dtype=torch.long, device=device)
    other_width = max((len(v) for v, row in zip(given, carrying) if len(v) != len(row[1])), default=None)
    values = []
    for row, mask in zip(rows, masks):
        ids = row[1]  # its mask: as long as its ids, or its inputs_embeds
        value = getattr(row, "fields", {}).get(name)
        if value is None:
            if name == "position_ids":
                value = [max(p, 0) for p in torch.tensor(mask).cumsum(-1).sub(1).tolist()]
            else:
                value = [fill] * (width if other_width is None else other_width)
            values.append(value)
            continue
        if len(value) != len(ids) and name != "labels":
            raise InvokeError(f"`{name}` has {len(value)} positions for a row of {len(ids)}: one per token is needed")
        if len(value) == len(ids) and other_width is None:
            pad = [fill] * (width - len(ids))
            values.append(pad + value if side == "left" else value + pad)
        else:
            values.append(value + [fill] * ((other_width or len(value)) - len(value)))
    try:
        return torch.tensor(values, dtype=torch.long, device=device)
    except ValueError as err:  # rows whose widths cannot be made one
        raise InvokeError(f"`{name}` has rows of different widths that do not match their ids: {err}") from None


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
