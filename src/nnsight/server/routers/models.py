"""``/v1/models``: what is served here, each model's load state, config and tokenizer files.

    GET /v1/models                    [ServedModel]: name, kind, config, status (cold/loading/ready/failed)
    GET /v1/models/{name}             one model (503 until its config is known)
    GET /v1/models/{name}/tokenizer   its tokenizer files
"""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Depends, HTTPException
from pydantic import Field

from ...remote.schema import ApiError, ModelInfo, TokenizerFiles
from ..state import ServerState, server_state

router = APIRouter(prefix="/v1/models", tags=["models"])
NOT_READY = {404: {"model": ApiError}, 503: {"model": ApiError}}


class ServedModel(ModelInfo):
    """A model as this server serves it (``ModelInfo`` plus its load state)."""

    status: str = Field(default="ready", description="cold (declared, not loaded), loading, ready, starting or failed")
    replicas: Optional[int] = Field(default=None, description="worker replicas serving it")


def _served(name, worker) -> ServedModel:
    info = worker.info or {"name": name, "kind": "language", "config": {}}
    replicas = len(getattr(worker, "replicas", ())) or 1
    return ServedModel(**{k: v for k, v in info.items() if k != "tokenizer"}, status=worker.state, replicas=replicas)


def _info(state: ServerState, name: str) -> dict:
    worker = state.workers.get(name)
    if worker is None:
        raise HTTPException(404, f"model {name!r} is not served here")
    if worker.info is None:
        worker.wanted()
        raise HTTPException(503, f"model {name!r} is {worker.state}; try again when it is ready")
    return worker.info


@router.get("", response_model=list[ServedModel])
def list_models(state: ServerState = Depends(server_state)):
    return [_served(name, worker) for name, worker in state.workers.items()]


@router.get("/{name}", response_model=ServedModel, responses=NOT_READY)
def get_model(name: str, state: ServerState = Depends(server_state)):
    _info(state, name)
    return _served(name, state.workers[name])


@router.get("/{name}/tokenizer", response_model=TokenizerFiles, responses=NOT_READY)
def get_tokenizer(name: str, state: ServerState = Depends(server_state)):
    return TokenizerFiles(files=_info(state, name).get("tokenizer", {}))
