"""Remote execution: ``model.trace(..., remote=True)`` sends the block to an nnsight server.

See ``client`` (the with-block and job handle), ``schema`` (the wire format) and
``serialize`` (values and tensors, no pickle).
"""

from ..sandbox.errors import SandboxError
from .serialize import UnsupportedValue


def __getattr__(name):
    if name in ("RemoteError", "JobError", "RemoteJob", "RemoteBlock"):
        from . import client

        return getattr(client, name)
    raise AttributeError(name)


__all__ = ["RemoteError", "JobError", "RemoteJob", "RemoteBlock", "SandboxError", "UnsupportedValue"]
