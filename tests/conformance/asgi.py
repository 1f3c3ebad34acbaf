"""The echo endpoint for daphne: ``daphne tests.conformance.asgi:application``.

Set up as ``chatsite.asgi`` is: ``serving.configure()`` decides the fast path
(``CHAT_FAST_PATH``) and patches daphne's replies, and ``tune_gc`` runs. Only
the chat's handshake is left out: the suite's client has no token.
"""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
django.setup(set_prefix=False)

from channels.routing import ProtocolTypeRouter  # noqa: E402

from chat import serving  # noqa: E402
from chat.policies import tune_gc  # noqa: E402
from tests.conformance.echo import EchoConsumer  # noqa: E402

serving.configure()
tune_gc()

application = ProtocolTypeRouter({"websocket": EchoConsumer.as_asgi()})
