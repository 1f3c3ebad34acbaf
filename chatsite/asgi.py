"""ASGI entry point: HTTP (Django views and static files) and ``/ws/``.

Run it with ``daphne chatsite.asgi:application``. Django is set up first
(``get_asgi_application``), then chat wraps it (``chat.asgi.chat_application``).
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
django_asgi_app = get_asgi_application()

from chat.asgi import chat_application  # noqa: E402

application = chat_application(django_asgi_app)
