"""The web shell: FastAPI app factory, routers, and the mapping of domain errors to HTTP."""

from app.api.main import create_app

__all__ = ["create_app"]
