"""chatsite's ASGI application with one fault put in, for close-code tests.

A ``history`` of the room ``boom`` raises an unexpected exception in the server
process, as a bug would: what a client then meets is 1011. Nothing else differs.
"""

# isort: off
from chatsite.asgi import application  # sets Django up, before chat is imported
from chat import selectors

# isort: on

FAULTY_ROOM = "boom"
_message_history = selectors.message_history


def message_history(*, room, **options):
    if room.slug == FAULTY_ROOM:
        raise RuntimeError("a fault put in by tests.faults")
    return _message_history(room=room, **options)


selectors.message_history = message_history

__all__ = ["application"]
