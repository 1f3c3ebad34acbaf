"""Log lines: plain or one JSON object each, with the connection they are about.

``CHAT_LOG_FORMAT`` picks the formatter (settings.LOGGING). ``bind_connection``
marks the current context as one socket's: asyncio tasks and sync_to_async
threads started from it copy the context, so every line logged while handling
that socket's frames names it. ``RequestLogMiddleware`` logs one line per HTTP
request on the "chat.requests" logger.
"""

import contextvars
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.db import DatabaseError
from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.utils.encoding import escape_uri_path

_connection: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "chat_log_connection", default=None
)

# What every LogRecord has; anything else on a record came with ``extra`` (or
# from ConnectionFilter) and goes into the JSON line as a key of its own.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}

requests_logger = logging.getLogger("chat.requests")


def bind_connection(connection_id: str, user: str) -> None:
    """Name this connection and user on every line logged in the current context."""
    _connection.set((connection_id, user))


def unbind_connection() -> None:
    """Stop naming a connection on the lines logged in the current context."""
    _connection.set(None)


def context_without_connection() -> contextvars.Context:
    """A copy of the current context bound to no connection.

    For process-wide tasks a socket's handler happens to start (the fan-out hub,
    the group commit): ``loop.create_task(coro, context=...)``, or every line
    they log would name that first socket.
    """
    context = contextvars.copy_context()
    context.run(_connection.set, None)
    return context


class ConnectionFilter(logging.Filter):
    """Add ``connection_id`` and ``user`` to a record logged in a bound context."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _connection.get()
        if bound is not None and not hasattr(record, "connection_id"):
            record.connection_id, record.user = bound
        return True


class PlainFormatter(logging.Formatter):
    """The message as it reads, then `` [conn=… user=…]`` when about a connection."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        connection_id = getattr(record, "connection_id", None)
        if connection_id is not None:
            text += f" [conn={connection_id} user={getattr(record, 'user', '-')}]"
        return text


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line (non-ASCII escaped, so no breaks)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra such as Django's ``request`` is logged as its repr.
        return json.dumps(line, default=str)


GetResponse = Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]


class RequestLogMiddleware:
    """Log each HTTP request: method, path, status, milliseconds, user id or "-"."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: GetResponse) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        started = time.perf_counter()
        response = self.get_response(request)
        assert isinstance(response, HttpResponseBase)
        milliseconds = (time.perf_counter() - started) * 1000
        try:
            user = getattr(request, "user", None)
            user_id = user.pk if user is not None and user.is_authenticated else None
        except DatabaseError:
            user_id = None  # the response stands; the line says "-"
        request_log(request, response.status_code, milliseconds, user_id)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter()
        response = self.get_response(request)
        assert not isinstance(response, HttpResponseBase)
        response = await response
        milliseconds = (time.perf_counter() - started) * 1000
        # request.user would query the database from the event loop: auser().
        auser = getattr(request, "auser", None)
        try:
            user = await auser() if auser is not None else None
            user_id = user.pk if user is not None and user.is_authenticated else None
        except DatabaseError:
            user_id = None
        request_log(request, response.status_code, milliseconds, user_id)
        return response


def request_log(
    request: HttpRequest, status: int, milliseconds: float, user_id: object
) -> None:
    """Log one request line; the path percent-encoded, so it stays one line."""
    method, path = request.method or "-", escape_uri_path(request.path)
    duration_ms = round(milliseconds, 1)
    requests_logger.info(
        "%s %s %s %.1fms user=%s",
        method,
        path,
        status,
        duration_ms,
        "-" if user_id is None else user_id,
        extra={
            "method": method,
            "path": path,
            "status": status,
            "duration_ms": duration_ms,
            "user_id": user_id,
        },
    )
