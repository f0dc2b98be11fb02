"""Exception raised when remote code is refused (importable without RestrictedPython)."""


class SandboxError(Exception):
    """Code sent for remote execution does something the server does not allow.

    The message names what was refused and, where known, the line.
    """
