"""The plain Channels chat of the official tutorial, served the same way as chatsite.

One ``AsyncWebsocketConsumer`` per socket, a group per room, ``group_send`` on
receive, channels-redis, daphne, no persistence: what the benchmark compares
chatsite with (``python -m bench --baseline`` or ``--compare``).
"""
