"""ASGI entry point: HTTP (Django views and static files) and ``/ws/``.

Run it with ``daphne chatsite.asgi:application``.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
django_asgi_app = get_asgi_application()

from chat import serving  # noqa: E402
from chat.application import ChatApplication, StaticFiles  # noqa: E402
from chat.consumers import ChatConsumer  # noqa: E402
from chat.policies import tune_gc  # noqa: E402

serving.configure()
tune_gc()

application = ChatApplication(
    http=StaticFiles(django_asgi_app),
    websocket=ChatConsumer.as_asgi(),
)
