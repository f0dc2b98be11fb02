"""PEFT adapters (LoRA and its relatives) on a ``LanguageModel``, switchable per trace.

    model = LanguageModel(hf_model, tokenizer=tok, peft="out/lora")   # or, later:
    model.load_adapter("out/lora")                      # attached in place, active from now on
    with model.trace("Hello"):
        a = model.transformer.h[0].attn.c_attn.lora_A["default"].output.save()
        model.transformer.h[0].attn.c_attn.lora_B["default"].output = 0
    with model.trace("Hello", adapter=None):            # the base model, for this trace only
        base = model.lm_head.output.save()
    model.load_adapter("out/other", adapter_name="other")
    with model.trace("Hello", adapter="default"):       # the first adapter again, this trace only
        ...

Options:
    load_adapter(path, adapter_name="default")   attach a saved adapter (a folder written by peft's
                         ``save_pretrained``) and make it the active one; an adapter already
                         loaded under that name is replaced. ``load_adapter(None)`` removes every
                         adapter (0.8.1's form).
    set_adapter(name)    make loaded adapter(s) active for later traces (a name, a list, or None
                         for none)
    disable_adapters() / enable_adapters()   the base model for later traces, and back
    with model.disable_adapter():   the base model for the traces inside the block
    unload_adapter(name=None)   remove one adapter (default: all of them)
    adapters             the names of the loaded adapters
    active_adapter       what runs when a trace names none (a name, a list, or None)
    trace/generate(..., adapter=...)   a name, a list of names, or None (the base model),
                         for that run only; the model's own setting is back afterwards

Each adapted module becomes peft's layer holding the original as ``base_layer``, so
paths to modules that are not adapted do not change, and the adapter's own modules are
envoys (``c_attn.lora_A["default"]``). A load that fails (a missing folder, weights
that match no module) leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import functools
import os

from ..tracing.errors import NNsightError

_NOTHING = object()


def import_peft():
    """``peft``, or an ImportError that says how to get it (it is an optional extra)."""
    try:
        import peft
    except ImportError as error:
        raise ImportError("PEFT adapters need the optional `peft` package: pip install 'nnsight[peft]'") from error
    return peft


def _tuner_layers(module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [sub for sub in module.modules() if isinstance(sub, BaseTunerLayer)]


def loaded_adapters(module) -> list:
    """Names of the adapters attached to ``module``, in load order."""
    names = []
    for layer in _tuner_layers(module):
        for name in layer._all_available_adapter_names():
            if name not in names:
                names.append(name)
    return names


def attach(module, path, adapter_name="default"):
    """Attach the adapter saved at ``path`` to ``module`` in place, under ``adapter_name``."""
    peft = import_peft()
    path = os.fspath(path)
    config = adapter_config(path)
    if config.is_prompt_learning or getattr(config, "is_adaption_prompt", False):
        raise NNsightError(
            f"the adapter at {path!r} is a {config.peft_type} adapter, which wraps the model's forward "
            "rather than adding modules; only adapters that add layers (LoRA and its relatives) can be attached"
        )
    config.inference_mode = True
    before = {id(p) for p in module.parameters()}
    peft.inject_adapter_in_model(config, module, adapter_name=adapter_name)
    try:
        added = {name for name, p in module.named_parameters() if id(p) not in before}
        state = peft.utils.load_peft_weights(path, device="cpu")
        # A PeftModel saves its keys from its own wrapper; the model we inject into is the inner one.
        state = {key.removeprefix("base_model.model."): value for key, value in state.items()}
        result = peft.set_peft_model_state_dict(module, state, adapter_name=adapter_name)
        missing = [key for key in result.missing_keys if key in added]
        if missing or result.unexpected_keys:
            unplaced = (list(result.unexpected_keys) or missing)[:3]
            raise NNsightError(
                f"the adapter at {path!r} does not fit this model: its weights name modules the model "
                f"does not have (e.g. {unplaced}); it was not attached"
            )
    except BaseException:
        detach(module, adapter_name)
        raise
    for layer in _tuner_layers(module):  # peft leaves a freshly added adapter trainable
        for name, param in layer.named_parameters():
            if f".{adapter_name}." in f".{name}.":
                param.requires_grad_(False)


def adapter_config(path):
    """The ``PeftConfig`` saved at ``path`` (a local folder, or a hub id peft can fetch)."""
    peft = import_peft()
    path = os.fspath(path)
    looks_local = os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(
            f"no adapter at {path!r}: expected a folder with adapter_config.json (written by peft's save_pretrained)"
        )
    return peft.PeftConfig.from_pretrained(path)


def detach(module, adapter_name=None):
    """Remove one adapter (``None``: all); a module left with no adapter gets its original back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, BaseTunerLayer):
                continue
            remaining = [n for n in child._all_available_adapter_names() if n != adapter_name]
            if adapter_name is None or not remaining:
                setattr(parent, name, child.get_base_layer())
            elif adapter_name in child._all_available_adapter_names():
                child.delete_adapter(adapter_name)
    config = getattr(module, "peft_config", None)
    if isinstance(config, dict):
        if adapter_name is None:
            config.clear()
        else:
            config.pop(adapter_name, None)
        if not config:
            del module.peft_config


def activate(module, choice):
    """Make ``choice`` (a name, a list of names, or None for the base model) what the adapters run."""
    layers = _tuner_layers(module)
    if choice is None:
        for layer in layers:
            layer.enable_adapters(False)
        return
    names = [choice] if isinstance(choice, str) else list(choice)
    known = loaded_adapters(module)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise NNsightError(
            f"adapter={choice!r}: no adapter named {unknown or names!r} is loaded (loaded: {known or 'none'}); "
            "use adapter=None for the base model"
        )
    for layer in layers:
        present = [n for n in names if n in layer._all_available_adapter_names()]
        if present:
            layer.set_adapter(present, inference_mode=True)
            layer.enable_adapters(True)
        else:
            layer.enable_adapters(False)


def active(module):
    """What the adapters of ``module`` run now: a name, a list of names, or None."""
    names = []
    for layer in _tuner_layers(module):
        if layer.disable_adapters:
            continue
        for name in layer.active_adapters:
            if name not in names:
                names.append(name)
    if not names:
        return None
    return names[0] if len(names) == 1 else names


@contextlib.contextmanager
def adapter_scope(module, choice):
    """Run with ``choice`` active, then put back every layer's setting and ``requires_grad``."""
    layers = _tuner_layers(module)
    if not layers and choice is not None:
        raise NNsightError(f"adapter={choice!r}: this model has no adapters loaded (model.load_adapter(path) first)")
    saved = [
        (layer, list(layer.active_adapters), layer.disable_adapters, [(p, p.requires_grad) for p in layer.parameters()])
        for layer in layers
    ]
    try:
        activate(module, choice)
        yield
    finally:
        for layer, names, disabled, grads in saved:
            layer.set_adapter(names, inference_mode=True)
            layer.enable_adapters(not disabled)
            for param, flag in grads:
                param.requires_grad_(flag)


def with_adapter_option(run):
    """Decorates a wrapper's run method: an ``adapter=`` option in its last (keyword) dict scopes the run."""

    @functools.wraps(run)
    def wrapper(self, *parts):
        options = parts[-1]
        if "adapter" not in options:
            return run(self, *parts)
        options = dict(options)
        choice = options.pop("adapter")
        with adapter_scope(self._module, choice):
            return run(self, *parts[:-1], options)

    return wrapper


class AdapterMixin:
    """``load_adapter`` / ``set_adapter`` / ``unload_adapter`` for a wrapper with a ``_module``."""

    def load_adapter(self, path, adapter_name: str = "default"):
        """Attach the adapter saved at ``path`` and make it active (``None``: remove every adapter)."""
        if path is None:
            return self.unload_adapter()
        dispatch = getattr(self, "dispatch", None)
        if dispatch is not None:
            dispatch()  # an adapter goes onto the real weights, not a meta stand-in
        import_peft()
        module = self._module
        adapter_config(path)  # a bad path fails before anything is removed
        if adapter_name in loaded_adapters(module):
            detach(module, adapter_name)
        attach(module, path, adapter_name)
        activate(module, adapter_name)
        self._tree_changed()
        return self

    def set_adapter(self, choice):
        """Make loaded adapter(s) what later traces run (``None``: the base model)."""
        import_peft()
        activate(self._module, choice)
        return self

    def disable_adapters(self):
        """Run the base model in later traces, until ``enable_adapters()`` (transformers' names)."""
        import_peft()
        for layer in _tuner_layers(self._module):
            layer.enable_adapters(False)
        return self

    def enable_adapters(self):
        """Undo ``disable_adapters()``: the active adapter(s) run again."""
        import_peft()
        for layer in _tuner_layers(self._module):
            layer.enable_adapters(True)
        return self

    def disable_adapter(self):
        """``with model.disable_adapter():`` traces in the block run the base model (peft's name)."""
        import_peft()
        return adapter_scope(self._module, None)

    def unload_adapter(self, adapter_name: str | None = None):
        """Remove one adapter, or every adapter (default); modules get their originals back."""
        import_peft()
        if adapter_name is not None and adapter_name not in loaded_adapters(self._module):
            raise NNsightError(
                f"no adapter named {adapter_name!r} is loaded (loaded: {loaded_adapters(self._module) or 'none'})"
            )
        detach(self._module, adapter_name)
        self._tree_changed()
        return self

    @property
    def adapters(self) -> list:
        """Names of the loaded adapters."""
        try:
            import_peft()
        except ImportError:
            return []
        return loaded_adapters(self._module)

    @property
    def active_adapter(self):
        """The adapter(s) a trace runs when it names none: a name, a list, or None."""
        if not self.adapters:
            return None
        return active(self._module)

    def _tree_changed(self):
        # Module positions (used for ordering errors) moved: recompute them on next use.
        object.__setattr__(self, "_order", None)
