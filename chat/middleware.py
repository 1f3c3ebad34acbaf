"""Handshake checks for ``/ws/``: API tokens and the browser ``Origin``."""

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser

from chat import selectors


def token_from_scope(scope):
    """The token of ``Authorization: Bearer <token>``, else of ``?token=``."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and key.strip():
                return key.strip()
            return ""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    values = query.get("token")
    return values[0] if values else None


class TokenAuthMiddleware(BaseMiddleware):
    """Put the user of an API token in ``scope["user"]``; a bad token means nobody.

    Without a token, the session user that ``AuthMiddlewareStack`` found stays.
    """

    async def __call__(self, scope, receive, send):
        key = token_from_scope(scope)
        if key is not None:
            token = await database_sync_to_async(selectors.token_get_active)(key=key)
            if token is None:
                scope = dict(scope, user=AnonymousUser(), token_id=None)
            else:
                scope = dict(scope, user=token.user, token_id=token.pk)
        return await super().__call__(scope, receive, send)


class BrowserOriginValidator(OriginValidator):
    """Refuse a handshake whose ``Origin`` is not ours; allow one without it.

    Browsers always send ``Origin``; other clients (which authenticate with a
    token, not a cookie) need not.
    """

    def __init__(self, application):
        super().__init__(application, allowed_origins=[])

    def valid_origin(self, parsed_origin):
        if parsed_origin is None:
            return True
        self.allowed_origins = settings.CHAT_ALLOWED_ORIGINS or settings.ALLOWED_HOSTS
        return self.validate_origin(parsed_origin)
