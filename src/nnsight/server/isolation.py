"""Defence in depth for worker processes, below the interpreter-level sandbox.

    command = worker_command([sys.executable, "-m", "nnsight.server.worker_process"], limits)
    layers = apply_isolation(data_dir="/srv/nnsight", memory_mb=None, weight_bytes=...)   # in the worker
    # {"network": "active", "data_dir": "active", "user": "active", "seccomp": "active", "memory": "active: 6144 MiB"}

Run in the worker once its model is loaded, each layer where the machine allows it:
    network   a new, empty network namespace (no interfaces up)
    data_dir  a new mount namespace with an empty read-only tmpfs over the server's data dir
    user      switch to the unprivileged user ``nobody`` (only when the server runs as root)
    seccomp   a filter that makes socket()/socketpair() fail with EACCES (x86_64 and aarch64)
    memory    an address-space limit (RLIMIT_AS) sized from the model and the machine
A layer that cannot be applied reports why instead of "active"; ``GET /health`` shows the report.
Without root, ``worker_command`` starts the worker in a user namespace (``unshare -rnm``) so the
network and data-dir layers still apply.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import shutil
import struct
import subprocess

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 0x4000, 1 << 18
NOBODY = 65534
_SECCOMP = {  # machine: (audit arch, seccomp syscall, socket, socketpair)
    "x86_64": (0xC000003E, 317, 41, 53),
    "aarch64": (0xC00000B7, 277, 198, 199),
}


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _userns_works() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    try:
        return subprocess.run([unshare, "-rnm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def worker_command(base: list, limits: dict) -> list:
    """The command line that starts a worker (inside a user namespace when not root and possible)."""
    if not limits.get("isolate", True) or os.name != "posix" or os.geteuid() == 0:
        return list(base)
    if _userns_works():
        return [shutil.which("unshare"), "-rnm", *base]
    return list(base)


def _new_namespaces(libc, data_dir):
    out = {}
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        out["network"] = "active"
    except OSError as error:
        out["network"] = f"not available ({error.strerror})"
    if not data_dir:
        out["data_dir"] = "not configured"
        return out
    try:
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
        if libc.mount(b"tmpfs", os.fsencode(data_dir), b"tmpfs", flags, b"size=4k") != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        out["data_dir"] = "active"
    except OSError as error:
        out["data_dir"] = f"not available ({error.strerror})"
    return out


def _world_readable(path) -> bool:
    """Every directory from / down to ``path`` can be entered by any user (and ``path`` read)."""
    import stat

    path = os.path.abspath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        mode = os.stat(os.sep.join(parts[:i]) or os.sep).st_mode
        if not mode & stat.S_IXOTH or not mode & stat.S_IROTH:
            return False
    return True


def _drop_user():
    import sys
    import sysconfig

    if os.geteuid() != 0:
        return "not available (the server does not run as root)"
    paths = {sys.prefix, sys.base_prefix, sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
             os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    if not all(_world_readable(p) for p in paths):
        # Code a job runs may still import lazily; as `nobody` those imports would fail.
        return "not available (the Python installation is not readable by other users)"
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    except OSError as error:  # a user namespace maps only our own uid
        return f"not available ({error.strerror})"
    return "active"


def _seccomp(libc):
    machine = platform.machine()
    if machine not in _SECCOMP:
        return f"not available (no filter for {machine})"
    arch, nr_seccomp, nr_socket, nr_socketpair = _SECCOMP[machine]

    def stmt(code, k):
        return struct.pack("HBBI", code, 0, 0, k)

    def jump(code, k, jt, jf):
        return struct.pack("HBBI", code, jt, jf, k)

    ld_w_abs, jeq_k, ret_k = 0x20, 0x15, 0x06
    allow, errno = 0x7FFF0000, 0x00050000 | 13  # SECCOMP_RET_ERRNO | EACCES
    program = b"".join([
        stmt(ld_w_abs, 4),  # seccomp_data.arch
        jump(jeq_k, arch, 1, 0),
        stmt(ret_k, allow),  # another ABI: this filter does not apply
        stmt(ld_w_abs, 0),  # seccomp_data.nr
        jump(jeq_k, nr_socket, 1, 0),
        jump(jeq_k, nr_socketpair, 0, 1),
        stmt(ret_k, errno),
        stmt(ret_k, allow),
    ])
    count = len(program) // 8
    buf = ctypes.create_string_buffer(program)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(count, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        return f"not available (no_new_privs: {os.strerror(ctypes.get_errno())})"
    # SECCOMP_SET_MODE_FILTER with TSYNC: every thread of the process (torch's too) gets the filter.
    if libc.syscall(nr_seccomp, 1, 1, ctypes.byref(fprog)) != 0:
        return f"not available ({os.strerror(ctypes.get_errno())})"
    return "active"


def _memory(memory_mb, weight_bytes):
    import resource

    if memory_mb == 0:
        return "off (--memory-mb 0)"
    if memory_mb is None:
        try:
            import torch

            if torch.cuda.is_available():  # CUDA reserves address space far beyond its use
                return "not applied (CUDA workers: use the GPU's own limits)"
        except ImportError:  # pragma: no cover
            pass
        with open("/proc/self/status") as f:
            vm = next((int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:")), 0)
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        headroom = min(max(2 << 30, 2 * weight_bytes), max(1 << 30, total // 2))
        wanted = (vm + headroom) >> 20 << 20
    else:
        wanted = memory_mb << 20
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (wanted, wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)))
    except (ValueError, OSError) as error:
        return f"not available ({error})"
    return f"active: {wanted >> 20} MiB"


def apply_isolation(data_dir=None, memory_mb=None, weight_bytes=0, enabled=True) -> dict:
    """Apply every layer the machine allows (see module docstring); returns layer -> report."""
    if not enabled:
        return {"network": "off (--no-isolate)", "data_dir": "off (--no-isolate)", "user": "off (--no-isolate)",
                "seccomp": "off (--no-isolate)", "memory": _memory(memory_mb, weight_bytes)}
    if os.name != "posix" or platform.system() != "Linux":
        return {"network": "not available (not Linux)", "memory": _memory(memory_mb, weight_bytes)}
    libc = _libc()
    layers = _new_namespaces(libc, data_dir)
    memory = _memory(memory_mb, weight_bytes)
    layers["user"] = _drop_user()
    layers["seccomp"] = _seccomp(libc)
    layers["memory"] = memory
    return layers
