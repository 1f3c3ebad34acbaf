"""Template context every page of chat's gets (add to TEMPLATES' context processors)."""

from django.conf import settings
from django.http import HttpRequest


def site_name(request: HttpRequest) -> dict[str, str]:
    """``chat_site_name``: ``CHAT_SITE_NAME``, for base.html's title and header."""
    return {"chat_site_name": settings.CHAT_SITE_NAME}
