"""The dicebox server: FastAPI app, its services and routers."""

from dicebox.server.app import create_app

__all__ = ["create_app"]
