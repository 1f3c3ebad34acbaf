"""Operations endpoints of every server process: /healthz, /readyz, /metrics.

As the contract's "Operations (HTTP)" says: ``/healthz`` answers while the
process serves (it touches nothing else), ``/readyz`` when the database and
Redis answer, and ``/metrics`` gives this process's Prometheus exposition
(``chat.metrics``) to the addresses of ``CHAT_METRICS_ALLOW`` only. Behind a
proxy every request comes from the proxy's address, so the proxy must refuse
``/metrics`` from outside itself (``deploy/`` does).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from functools import cache

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from chat import registry

logger = logging.getLogger(__name__)

# How long /readyz waits for each of the database and Redis.
READY_TIMEOUT = 2.0


@require_safe
def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain; charset=utf-8")


def _database_ping() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


async def _database_state() -> str:
    try:
        await asyncio.wait_for(database_sync_to_async(_database_ping)(), READY_TIMEOUT)
    except Exception as exc:
        logger.warning("readyz: the database does not answer: %r", exc)
        return "error"
    return "ok"


async def _redis_state() -> str:
    if not settings.REDIS_URL:
        return "off"
    store = registry.get_registry()
    try:
        assert isinstance(store, registry.RedisRegistry)
        await asyncio.wait_for(store.redis.ping(), READY_TIMEOUT)
    except Exception as exc:
        logger.warning("readyz: Redis does not answer: %r", exc)
        return "error"
    return "ok"


@require_safe
async def readyz(request: HttpRequest) -> JsonResponse:
    database, redis = await asyncio.gather(_database_state(), _redis_state())
    states = {"database": database, "redis": redis}
    ready = "error" not in states.values()
    return JsonResponse(states, status=200 if ready else 503)


@cache
def _allowed_networks(
    allowed: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in allowed)


def metrics_allowed(address: str | None) -> bool:
    """Whether ``address`` is one ``CHAT_METRICS_ALLOW`` lets read /metrics."""
    if not address:
        return False
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    networks = _allowed_networks(tuple(settings.CHAT_METRICS_ALLOW))
    return any(peer in network for network in networks)


@require_safe
def metrics(request: HttpRequest) -> HttpResponse:
    # The peer's own address: a forwarded one is whatever a client says.
    if not metrics_allowed(request.META.get("REMOTE_ADDR")):
        return HttpResponse(
            "forbidden", status=403, content_type="text/plain; charset=utf-8"
        )
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
