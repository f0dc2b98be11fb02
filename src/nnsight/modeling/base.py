"""``NNsight``: wrap any ``torch.nn.Module`` so ``with model.trace(x):`` can read and write its internals.

    from nnsight import NNsight
    model = NNsight(torch.nn.Sequential(torch.nn.Linear(5, 10), torch.nn.Linear(10, 2)))
    with model.trace(torch.rand(1, 5)):
        hidden = model[0].output.save()
        out = model.output.save()

Options of ``NNsight(module, rename=None, envoys=None)``:
    rename   aliases for module paths: ``{"transformer.h": "layers", "mlp": "ffn"}`` makes
             ``model.layers[0].ffn`` the envoy of ``transformer.h[0].mlp`` (both spellings work,
             in ``print(model)``, ``model.get(...)`` and cache lookups too)
    envoys   the class of each envoy: an ``Envoy`` subclass, or a dict keyed by module class or
             path name; a subclass's class attribute ``envoys`` is its default

Options of ``model.trace(*inputs, **kwargs)``:
    inputs, kwargs   passed to the module's forward (several invokes are concatenated on dim 0)

Subclasses adapt a model family by overriding:
    _prepare_input(*args, **kwargs) -> (args, kwargs, batch_size)   one invoke's input
    _batch(prepared, invokers) -> (args, kwargs)                    several invokes as one batch
    _run(args, kwargs)                                              one run of the model
"""

from __future__ import annotations

import torch

from ..tracing.aliases import AliasTable
from ..tracing.envoy import Envoy, TreeOptions
from ..tracing.batching import concatenate
from ..tracing.errors import NNsightError
from ..tracing.editing import EditTracer
from ..tracing.scan import ScanTracer
from ..tracing.session import Session
from ..tracing.tracer import Tracer


_DEFAULT = object()


def untraced(model, remote, tracer):
    """What ``model.trace(..., trace=False)`` returns: the output of running ``tracer`` now."""
    if remote:
        raise NNsightError(f"{type(model).__name__}.trace(trace=False) runs the model here: it takes no remote=")
    return tracer.run_untraced()


class NNsight(Envoy):
    """The root envoy of a traced model (see module docstring)."""

    envoys = None  # a subclass's default for envoys=

    def __init__(self, module: torch.nn.Module, rename: dict | None = None, envoys=_DEFAULT, **kwargs):
        if isinstance(module, Envoy):
            module = module._module
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"NNsight wraps a torch.nn.Module, not {type(module).__name__}")
        if kwargs:
            raise TypeError(f"NNsight() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
        super().__init__(module, "model")
        spec = type(self).envoys if envoys is _DEFAULT else envoys
        aliases = None
        if rename:
            reserved = {n for klass in type(self).__mro__ for n in vars(klass) if not n.startswith("_")}
            reserved |= {n for klass in Envoy.__mro__ for n in vars(klass) if not n.startswith("_")}
            aliases = AliasTable(module, rename, reserved)
        self._tree.aliases = aliases  # mutated, not replaced: every envoy shares this one object
        self._tree.envoys = TreeOptions.check_envoys(spec)
        object.__setattr__(self, "_order", None)
        object.__setattr__(self, "_edits", [])

    @property
    def _model(self) -> torch.nn.Module:
        """The wrapped module, under the name nnsight 0.8.1 (and libraries built on it) use."""
        return self._module

    def trace(self, *inputs, remote: bool = False, blocking: bool = True, trace: bool = True, **kwargs) -> Tracer:
        """A context that runs the model once on ``inputs`` with the block's code alongside.

        ``trace=False``: no block; run the model now (with its persistent edits) and return its output.
        """
        if not trace:
            return untraced(self, remote, Tracer(self, inputs, kwargs))
        if remote:
            from ..remote.client import remote_block

            return remote_block(self, "trace", inputs, kwargs, blocking, remote)
        return Tracer(self, inputs, kwargs)

    def scan(self, *inputs, **kwargs) -> ScanTracer:
        """Run the block on fake/meta tensors: shapes and dtypes without computation."""
        return ScanTracer(self, inputs, kwargs)

    def edit(self, inplace: bool = False) -> EditTracer:
        """``with model.edit() as edited:``: interventions every later trace of ``edited`` applies."""
        return EditTracer(self, inplace)

    def clear_edits(self):
        """Remove every persistent edit of this model."""
        object.__setattr__(self, "_edits", [])

    def session(self, remote: bool = False, blocking: bool = True) -> Session:
        """Group several traces; values flow from one to the next and are bound after the session."""
        if remote:
            from ..remote.client import remote_block

            return remote_block(self, "session", (), {}, blocking, remote)
        return Session(self)

    def _copy_for_edit(self):
        import copy

        edited = copy.copy(self)
        object.__setattr__(edited, "_hook", None)
        return edited

    def __setattr__(self, name, value):
        if name == "_edits":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # -- hooks for model families -------------------------------------------

    def _prepare_input(self, *args, **kwargs):
        size = None
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                size = value.shape[0]
                break
        return args, kwargs, 1 if size is None else size

    def _batch(self, prepared, invokers):
        if len(prepared) == 1:
            return prepared[0]
        first_args, first_kwargs = prepared[0]
        if any(len(a) != len(first_args) or k.keys() != first_kwargs.keys() for a, k in prepared):
            raise NNsightError("every invoke must pass the same positional and keyword arguments to be batched")
        args = tuple(concatenate([a[i] for a, _ in prepared]) for i in range(len(first_args)))
        kwargs = {key: concatenate([k[key] for _, k in prepared]) for key in first_kwargs}
        return args, kwargs

    def _run(self, args, kwargs):
        return self._module(*args, **kwargs)

    def _scan_inputs(self, args, kwargs):
        """Inputs for a shapes-only run (``model.scan``): a chance to drop data-dependent ones."""
        return args, kwargs

    def _module_order(self):
        if self._order is None:
            order = {envoy._display: i for i, envoy in enumerate(self._subtree())}
            object.__setattr__(self, "_order", order)
        return self._order

    # -- plain module behaviour ---------------------------------------------

    def to(self, *args, **kwargs):
        self._module.to(*args, **kwargs)
        return self

    def cpu(self):
        return self.to("cpu")

    def cuda(self, *args, **kwargs):
        self._module.cuda(*args, **kwargs)
        return self

    def eval(self):
        self._module.eval()
        return self

    def train(self, mode: bool = True):
        self._module.train(mode)
        return self
