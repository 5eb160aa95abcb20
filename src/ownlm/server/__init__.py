"""The OpenAI-compatible server. Nothing else in ownlm imports this package."""

from .app import ServerConfig, create_app
from .pool import ModelPool

__all__ = ["ServerConfig", "create_app", "ModelPool"]
