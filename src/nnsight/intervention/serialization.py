"""``dumps``/``loads``: values and the user's own code as bytes, without pickle.

    from nnsight.intervention.serialization import dumps, loads
    data = dumps({"probe": my_function, "w": torch.ones(3), "cfg": MyDataclass(k=2)})
    back = loads(data)          # the same values; functions and classes rebuilt from their source

The encoding is the remote protocol's: a JSON tree (schema ``nnsight-serialization`` version 1),
the source of functions and classes from the user's script and local modules (with closure
values, defaults and the globals they read), instances as their class plus ``__dict__``, and
tensors in one safetensors blob. ``loads`` rebuilds code through the remote sandbox, so code
that would need an import outside ``nnsight.remote.wire.IMPORTABLE_MODULES`` is refused with a
``SandboxError`` naming the import; rebuilt functions run with the sandbox's guards.
"""

from __future__ import annotations

import json

FORMAT = "nnsight-serialization"
VERSION = 1


def dumps(obj) -> bytes:
    """``obj`` as bytes (``UnsupportedValue`` names any part that cannot be encoded)."""
    from ..remote.byvalue import ByValue

    by_value = ByValue()
    encoder = by_value.encoder()
    tree = encoder.encode(obj, "value")
    document = {
        "format": FORMAT,
        "version": VERSION,
        "value": tree,
        "globals": by_value.globals,
        "definitions": by_value.definitions(),
        "tensors": encoder.blob(),
    }
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def loads(data: bytes):
    """The value ``dumps`` encoded; functions and classes are rebuilt by the remote sandbox."""
    import uuid

    import torch

    from ..remote.schema import FunctionSource
    from ..remote.serialize import Decoder, load_tensors
    from ..remote.wire import IMPORTABLE_MODULES
    from ..sandbox.errors import SandboxError
    from ..sandbox.guards import Guards
    from ..sandbox.runner import PREFIX, Definitions, decode_in_order, forget

    try:
        document = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("not nnsight serialization data (not JSON)") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError("not nnsight serialization data")
    if document.get("version") != VERSION:
        raise ValueError(f"nnsight serialization version {document.get('version')!r}; this nnsight reads version {VERSION}")
    specs = [FunctionSource.model_validate(spec).model_dump() for spec in document.get("definitions") or []]
    guards = Guards(torch.nn.Module())
    scope = guards.scope(print)
    tag = f"{PREFIX}loads-{uuid.uuid4().hex}"
    try:
        definitions = Definitions(specs, scope, tag, "<nnsight.loads>")

        def module(ref):
            name, _, attr = ref.partition(":")
            if name not in IMPORTABLE_MODULES:
                raise SandboxError(f"module {name!r} is not available (allowed: {', '.join(IMPORTABLE_MODULES)})")
            proxy = guards.proxy(name)
            return guards.getattr(proxy, attr) if attr else proxy

        decoder = Decoder(load_tensors(document.get("tensors")), module=module, function=definitions.resolve,
                          instance=definitions.instance)
        definitions.bind(decoder)
        raw_globals = document.get("globals") or {}
        if not isinstance(raw_globals, dict):
            raise ValueError("malformed globals")
        decode_in_order(raw_globals, decoder, scope)
        definitions.finish()
        return decoder.decode(document.get("value"), "value")
    finally:
        forget(tag.split("<nnsight-remote:", 1)[1])


__all__ = ["dumps", "loads", "FORMAT", "VERSION"]
