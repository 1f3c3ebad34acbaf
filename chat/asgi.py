"""The ASGI application of a site with chat: HTTP for Django, ``/ws/`` for chat.

Order matters. A project's asgi.py sets ``DJANGO_SETTINGS_MODULE``, calls Django's
``get_asgi_application()`` first (it sets Django up: settings, apps, chat's
setting defaults), and only then calls ``chat_application``, which imports
chat's consumer and models::

    import os

    from django.core.asgi import get_asgi_application

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
    django_asgi_app = get_asgi_application()

    from chat.asgi import chat_application  # noqa: E402

    application = chat_application(django_asgi_app)

Serve it with daphne (``daphne mysite.asgi:application``).
"""

from typing import TYPE_CHECKING, Any, cast

from django.apps import apps
from django.core.exceptions import ImproperlyConfigured

if TYPE_CHECKING:
    from chat.application import ChatApplication


def chat_application(django_asgi_app: Any) -> "ChatApplication":
    """Wrap the project's ``get_asgi_application()`` with chat's ``/ws/`` endpoint.

    Also decides chat.serving's fast path and tunes the garbage collector for a
    server process; call it once, in the process that serves.
    """
    if not apps.ready:
        raise ImproperlyConfigured(
            "chat_application() needs Django set up: call "
            "django.core.asgi.get_asgi_application() first and pass its result."
        )
    # Imported here, not at the top: they load models, which needs the apps ready.
    from chat import serving
    from chat.application import ASGIApp, ChatApplication, StaticFiles
    from chat.consumers import ChatConsumer
    from chat.policies import tune_gc

    serving.configure()
    tune_gc()
    # cast: asgiref types its handler's receive/send with Mapping, chat with dict.
    return ChatApplication(
        http=cast(ASGIApp, StaticFiles(django_asgi_app)),
        websocket=ChatConsumer.as_asgi(),
    )
