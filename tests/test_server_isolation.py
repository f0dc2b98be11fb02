"""Defence in depth for workers: each layer that reports itself active really holds (checked from inside)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

LAYERS = ("network", "data_dir", "user", "seccomp", "memory")

PROBE = textwrap.dedent("""
    import json, os, resource, socket, sys
    data = sys.argv[1]
    from nnsight.server.isolation import apply_isolation
    layers = apply_isolation(data, None, 10 << 20)
    seen = {}
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        seen["socket"] = "created"
    except PermissionError:
        seen["socket"] = "refused"
    try:
        socket.socketpair()
        seen["socketpair"] = "created"
    except PermissionError:
        seen["socketpair"] = "refused"
    with open("/proc/net/dev") as f:
        seen["interfaces"] = sorted(line.split(":")[0].strip() for line in f.readlines()[2:])
    try:
        seen["data_dir"] = os.listdir(data)
    except PermissionError:
        seen["data_dir"] = "unreadable"
    seen["uid"] = os.getuid()
    seen["rlimit_as"] = resource.getrlimit(resource.RLIMIT_AS)[0]
    print(json.dumps({"layers": layers, "seen": seen}))
""")


@pytest.fixture
def isolated(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "nnsight.db").write_text("secret keys")
    out = subprocess.run([sys.executable, "-c", PROBE, str(data)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_layer_reports_active_or_why_not(isolated):
    layers = isolated["layers"]
    assert set(layers) == set(LAYERS)
    for name, state in layers.items():
        assert state.startswith("active") or state.startswith("not available ("), (name, state)


def test_active_layers_hold(isolated):
    layers, seen = isolated["layers"], isolated["seen"]
    if layers["seccomp"] == "active":
        assert seen["socket"] == seen["socketpair"] == "refused"
    else:
        assert seen["socket"] == "created"
    if layers["network"] == "active":
        assert seen["interfaces"] == ["lo"]  # a fresh namespace: loopback only (and down)
    if layers["data_dir"] == "active":
        assert seen["data_dir"] in ([], "unreadable")
    else:
        assert seen["data_dir"] == ["nnsight.db"]
    if layers["user"] == "active":
        assert seen["uid"] == 65534
    if layers["memory"].startswith("active"):
        assert seen["rlimit_as"] == int(layers["memory"].split()[1]) << 20


def test_isolation_off_changes_nothing(tmp_path):
    code = ("import json, socket; from nnsight.server.isolation import apply_isolation; "
            "r = apply_isolation(None, 0, 0, enabled=False); socket.socket().close(); print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    layers = json.loads(out.stdout)
    assert layers["memory"] == "off (--memory-mb 0)" and layers["seccomp"] == "off (--no-isolate)"
