"""OpenAI-compatible embeddings server for nova-embeddings-v1 (FastAPI; see the README's "Serving" section).

    from scripts.nova_server import ServerSettings, create_app
    app = create_app(model, ServerSettings(api_key="..."))  # any ASGI server runs it; scripts/serve.py uses uvicorn
"""

from .app import NovaServer, create_app
from .settings import ServerSettings

__all__ = ["NovaServer", "ServerSettings", "create_app"]
