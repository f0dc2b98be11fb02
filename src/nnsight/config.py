"""``from nnsight import CONFIG``: where remote requests go and with which API key.

    CONFIG.set_default_api_key("nns_...")    # saved in ~/.config/nnsight/config.json
    CONFIG.API.HOST = "http://127.0.0.1:8000"
    CONFIG.save()                             # keep HOST for later sessions too

Precedence: environment (``NNSIGHT_HOST``, ``NNSIGHT_API_KEY``; the public client's
``NDIF_HOST``, ``NDIF_API_KEY`` when ours are unset) over the config file
(``$NNSIGHT_CONFIG_DIR/config.json``, default ``~/.config/nnsight/config.json``) over defaults.
``CONFIG.APP.REMOTE_LOGGING`` (default True) prints job status lines to stderr.
``CONFIG.APP.DEBUG = True`` (or ``NNSIGHT_DEBUG=1`` in the environment) keeps the engine's
own frames in tracebacks, which are hidden by default so errors point at your code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_HOST = "http://127.0.0.1:8000"


def config_dir() -> Path:
    return Path(os.environ.get("NNSIGHT_CONFIG_DIR") or Path.home() / ".config" / "nnsight")


class ApiConfig:
    def __init__(self):
        self.HOST = DEFAULT_HOST
        self.APIKEY = None
        self.TIMEOUT = 30.0  # seconds for one HTTP call (not for the job)

    def __repr__(self):
        return f"ApiConfig(HOST={self.HOST!r}, APIKEY={'set' if self.APIKEY else None})"


class AppConfig:
    def __init__(self):
        self.REMOTE_LOGGING = True
        self.DEBUG = False

    def __repr__(self):
        return f"AppConfig(REMOTE_LOGGING={self.REMOTE_LOGGING}, DEBUG={self.DEBUG})"


def debugging() -> bool:
    """Whether tracebacks keep nnsight's internal frames (``CONFIG.APP.DEBUG`` or ``NNSIGHT_DEBUG=1``)."""
    flag = os.environ.get("NNSIGHT_DEBUG", "").strip().lower()
    return bool(CONFIG.APP.DEBUG) or flag in ("1", "true", "yes", "on")


class Config:
    def __init__(self):
        self.API = ApiConfig()
        self.APP = AppConfig()
        self.load()

    @property
    def path(self) -> Path:
        return config_dir() / "config.json"

    def load(self):
        """(Re)read the config file and the environment."""
        self.API = ApiConfig()
        self.APP = AppConfig()
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        api = data.get("API", {}) if isinstance(data, dict) else {}
        if isinstance(api.get("HOST"), str):
            self.API.HOST = api["HOST"]
        if isinstance(api.get("APIKEY"), str):
            self.API.APIKEY = api["APIKEY"]
        app = data.get("APP", {}) if isinstance(data, dict) else {}
        if isinstance(app.get("REMOTE_LOGGING"), bool):
            self.APP.REMOTE_LOGGING = app["REMOTE_LOGGING"]
        # ours first, then the public client's names
        for host in ("NNSIGHT_HOST", "NDIF_HOST"):
            if os.environ.get(host):
                self.API.HOST = os.environ[host]
                break
        for key in ("NNSIGHT_API_KEY", "NDIF_API_KEY"):
            if os.environ.get(key):
                self.API.APIKEY = os.environ[key]
                break
        return self

    def save(self):
        """Write HOST, the API key and REMOTE_LOGGING to the config file (readable by you only)."""
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"API": {"HOST": self.API.HOST, "APIKEY": self.API.APIKEY}, "APP": {"REMOTE_LOGGING": self.APP.REMOTE_LOGGING}}
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)

    def set_default_api_key(self, key: str):
        """Use ``key`` for remote requests from now on, and save it in the config file."""
        if not isinstance(key, str) or not key.strip():
            raise ValueError("the API key must be a non-empty string")
        self.API.APIKEY = key.strip()
        self.save()

    def __repr__(self):
        return f"Config(API={self.API!r}, APP={self.APP!r})"


CONFIG = Config()
