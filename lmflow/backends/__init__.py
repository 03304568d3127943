"""Model servers behind one seam: `Backend` (list, load, unload, chat, health)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .base import Backend, ChatRequest, ChatResponse, ModelInfo

if TYPE_CHECKING:
    from ..spec.model import ServerConfig

__all__ = ["Backend", "ChatRequest", "ChatResponse", "ModelInfo", "create_backend"]


def create_backend(config: ServerConfig, spec_dir: Path | None = None) -> Backend:
    """The backend for a server config (imports only what that backend needs)."""
    if config.backend == "local":
        from .local import LocalBackend

        return LocalBackend(config, spec_dir)
    if config.backend == "lmstudio":
        from .lmstudio import LMStudioBackend

        return LMStudioBackend(config)
    if config.backend == "openai":
        from .openai import OpenAIBackend

        return OpenAIBackend(config)
    raise ValueError(f"unknown backend {config.backend!r}")
