"""Values on the wire: JSON trees with tagged objects, tensors in one safetensors blob. No pickle.

    tree, blob = encode_values({"x": torch.ones(2), "n": 3})   # blob: base64 safetensors or None
    values = decode_values(tree, blob)                          # {"x": tensor([1., 1.]), "n": 3}

Encoding of one value:
    None, bool, int, str, finite float    as themselves
    list                                  a JSON array
    tuple                                 {"$t": "tuple", "items": [...]}
    dict                                  {"$t": "dict", "items": [[key, value], ...]}  (keys: str, int, float, bool, None)
    non-finite float                      {"$t": "float", "v": "nan" | "inf" | "-inf"}
    torch.Tensor                          {"$t": "tensor", "id": "t0"}  (the tensor is entry "t0" of the blob)
    torch.Size                            {"$t": "size", "items": [...]}
    slice                                 {"$t": "slice", "v": [start, stop, step]}
    torch.dtype / torch.device            {"$t": "dtype", "v": "float32"} / {"$t": "device", "v": "cpu"}
    a module envoy of the served model    {"$t": "envoy", "path": "model.transformer.h.0"}
    an allowed module (torch, math, ...)  {"$t": "module", "name": "torch"}
    a user function (source sent aside)   {"$t": "function", "name": "f"}
    a tracer.cache() result               {"$t": "cache", "entries": [[path, [[output, inputs], ...]], ...]}
    a function of an allowed module       {"$t": "module", "name": "torch.nn.functional:gelu"}
    an instance of a user class           {"$t": "object", "class": "Point", "state": {...its __dict__}}
    the user's own module                 {"$t": "namespace", "name": "helpers", "items": [[attr, value]], "missing": {attr: why}}

Anything else raises ``UnsupportedValue`` naming where it was found.
"""

from __future__ import annotations

import base64
import math
import types

import torch

from ..sandbox.errors import SandboxError

MAX_DEPTH = 32
MAX_NODES = 200_000


class UnsupportedValue(TypeError):
    """A value that cannot be sent to (or back from) the server."""


class Encoder:
    def __init__(self, envoy_path=None, module_name=None, function_name=None, object_state=None):
        self.tensors: dict[str, torch.Tensor] = {}
        self.object_state = object_state  # value -> (class name, state dict) or None
        self._ids: dict[int, str] = {}
        self.nodes = 0
        self.envoy_path = envoy_path  # value -> path or None
        self.module_name = module_name  # value -> name or None
        self.function_name = function_name  # value -> name or None

    def encode(self, value, where, depth=0):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise UnsupportedValue(f"{where}: too many values (more than {MAX_NODES})")
        if depth > MAX_DEPTH:
            raise UnsupportedValue(f"{where}: nested more than {MAX_DEPTH} levels deep")
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and type(value) is int:
            return value
        if type(value) is float:
            if math.isfinite(value):
                return value
            return {"$t": "float", "v": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
        if isinstance(value, torch.Tensor):
            return {"$t": "tensor", "id": self._tensor(value, where)}
        if type(value) is list:
            return [self.encode(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
        if type(value) is torch.Size:
            return {"$t": "size", "items": list(value)}
        if type(value) is tuple:
            return {"$t": "tuple", "items": [self.encode(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]}
        if type(value) is dict:
            items = []
            for k, v in value.items():
                if not (k is None or type(k) in (str, int, float, bool)):
                    raise UnsupportedValue(f"{where}: dictionary keys must be str, int, float, bool or None, not {type(k).__name__}")
                items.append([self.encode(k, f"{where} key", depth + 1), self.encode(v, f"{where}[{k!r}]", depth + 1)])
            return {"$t": "dict", "items": items}
        if _is_cache(value):
            entries = [
                [path, [[self.encode(c.output, f"{where}[{path!r}].output", depth + 2),
                         self.encode(c.inputs, f"{where}[{path!r}].inputs", depth + 2)] for c in view.calls]]
                for path, view in value.items()
            ]
            return {"$t": "cache", "entries": entries}
        fields = _model_output_fields(value)
        if fields is not None:
            items = []
            for k, v in fields:
                try:
                    items.append([k, self.encode(v, f"{where}.{k}", depth + 1)])
                except UnsupportedValue:
                    items.append([k, None])  # e.g. a KV cache object: left out, like a field never set
            return {"$t": "model_output", "class": type(value).__name__, "items": items}
        if type(value) is slice:
            return {"$t": "slice", "v": [self.encode(p, where, depth + 1) for p in (value.start, value.stop, value.step)]}
        if isinstance(value, torch.dtype):
            return {"$t": "dtype", "v": str(value).replace("torch.", "")}
        if isinstance(value, torch.device):
            return {"$t": "device", "v": str(value)}
        for finder, tag, key in ((self.envoy_path, "envoy", "path"), (self.module_name, "module", "name"), (self.function_name, "function", "name")):
            if finder is not None:
                found = finder(value)
                if found is not None:
                    return {"$t": tag, key: found}
        if self.object_state is not None and isinstance(value, types.ModuleType):
            found = self.object_state(value)
            if found is not None:
                name, attrs, missing = found
                items = []
                for k, v in attrs.items():
                    try:
                        items.append([k, self.encode(v, f"{name}.{k}", depth + 1)])
                    except UnsupportedValue as error:
                        missing[k] = str(error)
                return {"$t": "namespace", "name": name, "items": items, "missing": missing}
        if self.object_state is not None:
            found = self.object_state(value)
            if found is not None:
                cls, state = found
                return {"$t": "object", "class": cls, "state": self.encode(state, f"{where}.__dict__", depth + 1)}
        raise UnsupportedValue(
            f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which cannot be sent to the server "
            "(tensors, numbers, strings, bools, None, lists/tuples/dicts of them, module envoys, "
            "allowed modules and plain functions can)"
        )

    def _tensor(self, tensor, where):
        key = self._ids.get(id(tensor))
        if key is None:
            if tensor.is_meta:
                raise UnsupportedValue(f"{where} is a tensor on the meta device (it has no values to send)")
            if tensor.layout != torch.strided:
                raise UnsupportedValue(f"{where} is a {tensor.layout} tensor; only dense tensors can be sent")
            key = f"t{len(self.tensors)}"
            self.tensors[key] = tensor.detach().to("cpu").contiguous().clone()
            self._ids[id(tensor)] = key
        return key

    def blob(self) -> str | None:
        if not self.tensors:
            return None
        from safetensors.torch import save

        return base64.b64encode(save(self.tensors)).decode("ascii")


def tensor_bytes(blob: str | None) -> int:
    """Decoded size of a base64 blob, without decoding it."""
    if not blob:
        return 0
    return len(blob) * 3 // 4


def load_tensors(blob: str | None, max_bytes: int | None = None) -> dict:
    if not blob:
        return {}
    if max_bytes is not None and tensor_bytes(blob) > max_bytes:
        raise ValueError(f"tensors are {tensor_bytes(blob)} bytes; the limit is {max_bytes}")
    try:
        raw = base64.b64decode(blob, validate=True)
    except Exception:
        raise ValueError("tensors: not valid base64") from None
    from safetensors.torch import load

    try:
        return load(raw)
    except Exception as error:
        raise ValueError(f"tensors: not a valid safetensors blob ({type(error).__name__})") from None


class Decoder:
    def __init__(self, tensors, envoy=None, module=None, function=None, instance=None, cache=None):
        self.tensors = tensors
        self.cache = cache  # {path: [(output, inputs)]} -> a Cache of the caller's model
        self.instance = instance  # (class name, state dict) -> object
        self.nodes = 0
        self.envoy = envoy
        self.module = module
        self.function = function

    def decode(self, value, where="value", depth=0):
        self.nodes += 1
        if self.nodes > MAX_NODES or depth > MAX_DEPTH:
            raise ValueError(f"{where}: too many or too deeply nested values")
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self.decode(v, where, depth + 1) for v in value]
        if not isinstance(value, dict) or not isinstance(value.get("$t"), str):
            raise ValueError(f"{where}: malformed value")
        tag = value["$t"]
        if tag == "tensor":
            key = value.get("id")
            if not isinstance(key, str) or key not in self.tensors:
                raise ValueError(f"{where}: refers to a tensor {key!r} that was not sent")
            return self.tensors[key]
        if tag in ("tuple", "size"):
            items = value.get("items")
            if not isinstance(items, list):
                raise ValueError(f"{where}: malformed {tag}")
            decoded = tuple(self.decode(v, where, depth + 1) for v in items)
            if tag == "size":
                if not all(type(v) is int for v in decoded):
                    raise ValueError(f"{where}: malformed size")
                return torch.Size(decoded)
            return decoded
        if tag == "dict":
            items = value.get("items")
            if not isinstance(items, list):
                raise ValueError(f"{where}: malformed dict")
            out = {}
            for pair in items:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise ValueError(f"{where}: malformed dict item")
                key = self.decode(pair[0], where, depth + 1)
                if not (key is None or type(key) in (str, int, float, bool)):
                    raise ValueError(f"{where}: malformed dict key")
                out[key] = self.decode(pair[1], where, depth + 1)
            return out
        if tag == "model_output":
            items = value.get("items")
            if not isinstance(items, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in items):
                raise ValueError(f"{where}: malformed model output")
            fields = {k: self.decode(v, where, depth + 1) for k, v in items}
            return _make_model_output(value.get("class"), fields)
        if tag == "cache":
            entries = value.get("entries")
            if self.cache is None:
                raise ValueError(f"{where}: a tracer.cache() result can only be decoded with its model")
            if not isinstance(entries, list) or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
                                                        and isinstance(p[1], list) for p in entries):
                raise ValueError(f"{where}: malformed cache")
            calls = {}
            for path, raw in entries:
                if not all(isinstance(c, list) and len(c) == 2 for c in raw):
                    raise ValueError(f"{where}: malformed cache entry {path!r}")
                calls[path] = [(self.decode(o, where, depth + 2), self.decode(i, where, depth + 2)) for o, i in raw]
            return self.cache(calls)
        if tag == "float":
            v = value.get("v")
            if v not in ("nan", "inf", "-inf"):
                raise ValueError(f"{where}: malformed float")
            return float(v)
        if tag == "slice":
            parts = value.get("v")
            if not isinstance(parts, list) or len(parts) != 3:
                raise ValueError(f"{where}: malformed slice")
            parts = [self.decode(p, where, depth + 1) for p in parts]
            if not all(p is None or type(p) is int for p in parts):
                raise ValueError(f"{where}: slice parts must be int or None")
            return slice(*parts)
        if tag == "dtype":
            name = value.get("v")
            dtype = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{where}: unknown dtype {name!r}")
            return dtype
        if tag == "device":
            try:
                return torch.device(str(value.get("v")))
            except Exception:
                raise ValueError(f"{where}: malformed device") from None
        if tag == "namespace":
            items, missing, name = value.get("items"), value.get("missing") or {}, value.get("name")
            if (not isinstance(name, str) or not isinstance(items, list) or not isinstance(missing, dict)
                    or not all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in items)):
                raise ValueError(f"{where}: malformed namespace")
            attrs, missing = {}, {str(k): str(v)[:500] for k, v in missing.items()}
            for k, v in items:
                try:
                    attrs[k] = self.decode(v, where, depth + 1)
                except SandboxError as error:  # a member the receiver refuses fails when used, naming why
                    missing[k] = str(error)
            return Namespace(name, attrs, missing)
        if tag == "object":
            if self.instance is None:
                raise ValueError(f"{where}: an object is not expected here")
            cls, state = value.get("class"), self.decode(value.get("state"), where, depth + 1)
            if not isinstance(cls, str) or not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
                raise ValueError(f"{where}: malformed object")
            return self.instance(cls, state)
        for tag_name, resolver, key in (("envoy", self.envoy, "path"), ("module", self.module, "name"), ("function", self.function, "name")):
            if tag == tag_name:
                if resolver is None:
                    raise ValueError(f"{where}: a {tag} is not expected here")
                ref = value.get(key)
                if not isinstance(ref, str):
                    raise ValueError(f"{where}: malformed {tag}")
                return resolver(ref)
        raise ValueError(f"{where}: unknown value tag {tag!r}")


class Namespace:
    """The user's own module, sent by value: its functions, classes and constants, read-only."""

    def __init__(self, name, attrs, missing):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_attrs", attrs)
        object.__setattr__(self, "_missing", missing)

    def get(self, attr):
        if attr in self._attrs:
            return self._attrs[attr]
        if attr in self._missing:
            raise AttributeError(f"{self._name}.{attr} was not sent: {self._missing[attr]}")
        raise AttributeError(f"module {self._name!r} has no attribute {attr!r}")

    def __getattr__(self, attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return self.get(attr)

    def __setattr__(self, attr, value):
        raise TypeError(f"the module {self._name} sent by value is read-only")

    def __repr__(self):
        return f"<module {self._name!r} (sent by value)>"


def _is_cache(value):
    from ..tracing.cache import Cache

    return type(value) is Cache


def _model_output_fields(value):
    """``[(name, value)]`` of a transformers ``ModelOutput`` (any field, set or not), else None."""
    cls = type(value)
    if cls.__module__ != "transformers.modeling_outputs" and not cls.__module__.startswith("transformers.models."):
        return None
    try:
        from transformers.utils import ModelOutput
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(value, ModelOutput):
        return None
    import dataclasses

    return [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]


def _make_model_output(name, fields):
    """The transformers output class ``name`` (from transformers.modeling_outputs only), else a dict."""
    try:
        import transformers.modeling_outputs as outputs
        from transformers.utils import ModelOutput
    except ImportError:  # pragma: no cover
        return fields
    cls = getattr(outputs, name, None) if isinstance(name, str) and name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, ModelOutput):
        try:
            return cls(**fields)
        except TypeError:
            pass
    return fields


def encode_values(values: dict, **finders) -> tuple[dict, str | None]:
    encoder = Encoder(**finders)
    tree = {name: encoder.encode(value, f"{name!r}") for name, value in values.items()}
    return tree, encoder.blob()


def decode_values(tree: dict, blob: str | None, max_bytes=None, **resolvers) -> dict:
    return decode_with_tensors(tree, load_tensors(blob, max_bytes), **resolvers)


def decode_with_tensors(tree: dict, tensors: dict, **resolvers) -> dict:
    """``decode_values`` with the tensors already read (``stream.ResultReader`` reads them as they download)."""
    decoder = Decoder(tensors, **resolvers)
    if not isinstance(tree, dict):
        raise ValueError("values must be an object")
    return {name: decoder.decode(value, repr(name)) for name, value in tree.items()}
