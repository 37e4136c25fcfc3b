"""The admin dashboard: campaigns and their charts, an address's suppression proof, the queue
and the webhooks, behind a login, on a listener of its own."""

from .app import SECURITY_HEADERS, create_admin_app
from .views import QueueReader, QueueView

__all__ = ["SECURITY_HEADERS", "QueueReader", "QueueView", "create_admin_app"]
