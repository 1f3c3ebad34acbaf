"""The chat app's settings and their defaults, for a project that leaves them out.

``ChatConfig.ready`` sets each name of ``DEFAULTS`` the project's settings do not
define (as django-appconf does), so chat's modules read ``settings.CHAT_*``
plainly. The values are chatsite's defaults (chatsite/settings.py, where each
comes from the environment); docs/integrate.md has the table.
"""

import copy
from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # redis://… for channels-redis, presence, the connection registry and rate
    # limits across processes; "": in-process only, one server process.
    "REDIS_URL": "",
    # Prefix of chat's Redis keys (and, in chatsite, of the layer's channels).
    "CHAT_REDIS_PREFIX": "chat",
    # Seconds within which a client must send something (sent in hello).
    "CHAT_HEARTBEAT": 30,
    # Origins (scheme://host[:port]) browsers may open sockets from; []: this site.
    "CHAT_ALLOWED_ORIGINS": [],
    # Close open sockets with 1001 when the server process gets SIGTERM.
    "CHAT_CLOSE_ON_SIGTERM": True,
    # Write prepared frames straight to daphne's sockets (chat.serving).
    "CHAT_FAST_PATH": True,
    # Live sockets per user across processes; the next closes with 1013 (0: none).
    "CHAT_MAX_CONNECTIONS_PER_USER": 20,
    # Database frames per user across sockets and processes: "N/S"; "0": no limit.
    "CHAT_RATE_LIMIT": "60/10",
    # New accounts per client address on the sign-up page: "N/S"; "0": no limit.
    "CHAT_SIGNUP_RATE": "5/3600",
    # Bytes waiting to be written to one socket before it closes with 1008 (0: off).
    "CHAT_SEND_BUFFER_BYTES": 1 << 20,
    # Addresses or networks (CIDR) that may read /metrics.
    "CHAT_METRICS_ALLOW": ["127.0.0.1", "::1"],
    # Count the client address a proxy appended to X-Forwarded-For, not the peer's.
    "CHAT_CLIENT_IP_FROM_PROXY": False,
    # The largest file POST /api/uploads takes; larger ones get 413.
    "CHAT_MAX_UPLOAD_BYTES": 10 * 1024 * 1024,
    # "": attachments streamed by Django; "/prefix/": sent by nginx from that
    # internal location (X-Accel-Redirect) once the view has checked access.
    "CHAT_ACCEL_REDIRECT": "",
    # The site's name in every page's title and header (chat.context_processors).
    "CHAT_SITE_NAME": "chatsite",
}


def apply_defaults() -> None:
    """Set each setting of ``DEFAULTS`` the project did not define."""
    for name, value in DEFAULTS.items():
        if not hasattr(settings, name):
            # A copy: a project that changes its list must not change DEFAULTS.
            setattr(settings, name, copy.copy(value))
