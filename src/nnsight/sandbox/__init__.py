"""The restricted execution layer for code that arrives over the network.

Layers, outermost first:

1. ``policy.check_source``: a static AST check of the user's source (no dunder or
   ``_guard_``-style names, which start *and* end with ``_``; imports only from
   ``remote.wire.IMPORTABLE_MODULES``; no eval/exec/open/getattr/type/...; classes
   only with allowed dunder methods and no metaclass; no ``global`` or ``async with``;
   no ``out=`` keywords), plus size limits.
2. ``policy.restricted_compile``: RestrictedPython's transformer on the code the
   tracing engine generates, so every attribute read, item read, iteration,
   attribute/item write and augmented assignment goes through a guard.
3. ``guards.Guards``: the runtime guards. Attribute access is allowed only on an
   allow-list of value types (tensors, numbers, strings, containers, envoys,
   tracers, curated module proxies, classes remote code defined and their
   instances, torch modules it created); tensors that share storage with the
   model's weights (or whose storage cannot be read) are read-only; the torch surface is a curated proxy without file,
   network, pickle, JIT or extension APIs.
4. The worker process (``nnsight.server.worker_process``): no secrets in its
   environment, OS limits (``resource.setrlimit``), a wall-clock limit enforced
   by the server, and an integrity check of the model after every job.
"""

from .errors import SandboxError

__all__ = ["SandboxError"]
