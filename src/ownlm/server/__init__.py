"""The OpenAI-compatible server. Nothing else in ownlm imports this package.

    from ownlm.server import ModelPool, Server
    with Server(ModelPool(["smollm2"]), port=0) as server:
        ...  # OpenAI(base_url=server.base_url, api_key="unused")
"""

from .app import ServerConfig, create_app
from .pool import ModelPool
from .serving import Server

__all__ = ["ModelPool", "Server", "ServerConfig", "create_app"]
