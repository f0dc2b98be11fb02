"""The wire format of remote execution (pydantic models; the server publishes them as OpenAPI).

A request carries the *source text* of the ``with`` block's body, the line it starts on,
the values the body reads from the caller's scope (see ``serialize`` for their encoding)
and the sources of plain functions it calls. Tensors travel as one base64 safetensors blob.
Nothing is pickled in either direction.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION = 1

Status = Literal["received", "queued", "running", "completed", "error", "cancelled"]
TERMINAL = ("completed", "error", "cancelled")
_IDENT = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"  # names that also end with "_" are refused by the sandbox


class FunctionSource(BaseModel):
    """A plain function defined by the user, sent as source text and compiled in the sandbox."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=_IDENT)
    source: str = Field(max_length=100_000, description="the `def` statement, dedented")
    lineno: int = Field(ge=1, le=1_000_000, description="line of the `def` in the user's file")
    filename: str = Field(default="<remote>", max_length=500)
    closure: dict[str, Any] = Field(default_factory=dict, description="encoded values of the variables it closes over")
    defaults: Optional[Any] = Field(default=None, description="encoded list: the function's default values")
    kwdefaults: Optional[Any] = Field(default=None, description="encoded dict: its keyword-only defaults")


class JobRequest(BaseModel):
    """One ``with model.trace/generate/session(..., remote=True)`` block."""

    model_config = ConfigDict(extra="forbid")
    protocol: int = Field(default=PROTOCOL_VERSION, description="wire format version")
    model: str = Field(max_length=200, description="name of a served model (GET /v1/models)")
    kind: Literal["trace", "generate", "session"]
    source: str = Field(max_length=200_000, description="the body of the `with` block, lines as in the user's file")
    body_lineno: int = Field(ge=2, le=1_000_000, description="line number of the body's first line in the user's file")
    filename: str = Field(default="<remote>", max_length=500, description="the user's file name, for messages")
    as_name: Optional[str] = Field(default=None, pattern=_IDENT, description="the name after `as`, if any")
    inputs: list[Any] = Field(default_factory=list, description="encoded positional inputs of trace/generate")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="encoded keyword arguments of trace/generate")
    variables: dict[str, Any] = Field(default_factory=dict, description="encoded values the body reads from the caller")
    functions: list[FunctionSource] = Field(default_factory=list, max_length=64)
    tensors: Optional[str] = Field(default=None, description="base64 safetensors holding every tensor referenced above")


class Frame(BaseModel):
    filename: str
    lineno: int
    name: str
    line: str = ""


class ErrorInfo(BaseModel):
    type: str = Field(description="exception class name (builtin, nnsight or SandboxError; else RemoteError)")
    message: str
    traceback: list[Frame] = Field(default_factory=list, description="frames in the user's code, innermost last")


class JobStatus(BaseModel):
    id: str
    model: str
    status: Status
    position: Optional[int] = Field(default=None, description="place in the queue (0 = next) while queued")
    created: float
    updated: float
    error: Optional[ErrorInfo] = None
    stdout: str = Field(default="", description="what the code printed so far")


class JobEvent(BaseModel):
    """One server-sent event of ``GET /v1/jobs/{id}/events`` (``event: status`` or ``event: log``)."""

    status: Optional[Status] = None
    position: Optional[int] = None
    text: Optional[str] = None
    error: Optional[ErrorInfo] = None


class JobResult(BaseModel):
    id: str
    values: dict[str, Any] = Field(description="encoded saved values by name")
    tensors: Optional[str] = Field(default=None, description="base64 safetensors")


class ModelInfo(BaseModel):
    name: str
    kind: str = Field(description="'language' (LanguageModel) or 'module'")
    config: dict[str, Any] = Field(default_factory=dict, description="the Hugging Face config, as a dict")


class TokenizerFiles(BaseModel):
    files: dict[str, str] = Field(description="tokenizer file name -> text content")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    models: dict[str, str]
    queue: int
    uptime_s: float


class ApiError(BaseModel):
    detail: str
    error: Optional[ErrorInfo] = None
