"""The HTTP server: an app factory, the control routes and hypercorn serving."""

from dmr.server.app import create_app
from dmr.server.services import Services, get_services

__all__ = ["Services", "create_app", "get_services"]
