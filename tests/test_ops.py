"""/healthz, /readyz and /metrics of real daphne processes (the contract's
"Operations (HTTP)"), with a redis-server of the test's own to stop."""

import asyncio
import http.client
import json
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_multiprocess import TIMEOUT, join, room_create, user_with_key
from tests.waiting import until

pytestmark = [pytest.mark.redis, pytest.mark.django_db(transaction=True)]


def get(url):
    """(status, content type, body text) of a GET, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


async def fetch(server, path):
    status, content_type, body = await asyncio.to_thread(
        get, f"{server.http_url}{path}"
    )
    return status, content_type, body.decode()


def samples(exposition):
    """{(name, labels as a sorted tuple): value} of a Prometheus exposition."""
    found = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_healthz_answers_ok(start_daphne):
    server = start_daphne()
    assert await fetch(server, "/healthz") == (200, "text/plain; charset=utf-8", "ok")


def plain_get(server, path):
    """(status, Location) of a plain-HTTP GET that follows no redirect."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Location")
    finally:
        conn.close()


async def test_behind_a_tls_proxy_the_ops_endpoints_still_answer_plain_http(
    start_daphne,
):
    # A probe on the machine asks the process itself, with no X-Forwarded-Proto.
    server = start_daphne(extra_env={"DJANGO_BEHIND_TLS_PROXY": "1"})
    for path in ("/healthz", "/readyz", "/metrics"):
        assert await asyncio.to_thread(plain_get, server, path) == (200, None), path
    assert await asyncio.to_thread(plain_get, server, "/accounts/login/") == (
        301,
        f"https://127.0.0.1:{server.port}/accounts/login/",
    )


async def test_readyz_says_each_dependency_and_503_while_redis_is_down(
    start_daphne, own_redis
):
    with_redis = start_daphne(redis_url=own_redis.url)
    without = start_daphne()
    ok = (200, "application/json", json.dumps({"database": "ok", "redis": "ok"}))
    assert await fetch(with_redis, "/readyz") == ok
    off = {"database": "ok", "redis": "off"}
    assert await fetch(without, "/readyz") == (200, "application/json", json.dumps(off))

    own_redis.stop()
    failing = {"database": "ok", "redis": "error"}
    assert await fetch(with_redis, "/readyz") == (
        503,
        "application/json",
        json.dumps(failing),
    )
    own_redis.start()

    async def answer():
        return await fetch(with_redis, "/readyz")

    await until(answer, lambda got: got == ok, timeout=15, what="redis back")


async def test_metrics_count_connections_frames_messages_and_errors(
    start_daphne, chat_client
):
    server = start_daphne()
    alice, alice_key = await user_with_key("alice")
    bob, bob_key = await user_with_key("bob")
    await room_create("lobby")
    # No keep-alive pings: they would count among the frames.
    on_alice = await chat_client(server, alice_key, name="alice", keepalive=False)
    on_bob = await chat_client(server, bob_key, name="bob", keepalive=False)
    await join(on_alice, "lobby")
    await join(on_bob, "lobby", skip=())
    await on_alice.expect("presence", timeout=TIMEOUT)
    await on_alice.send(
        {"type": "send", "room": "lobby", "body": "hi", "client_msg_id": "c1"}
    )
    await on_bob.expect("message", timeout=TIMEOUT)
    got = {
        (await on_alice.next_frame(TIMEOUT))["type"],
        (await on_alice.next_frame(TIMEOUT))["type"],
    }
    assert got == {"ack", "message"}
    await on_bob.send({"type": "join", "room": "nowhere", "ref": "x"})
    assert (await on_bob.expect("error", timeout=TIMEOUT))["code"] == "not_found"
    await on_alice.close()

    def counted(found):
        return found.get(("chat_connections", ())) == 1.0

    async def scrape():
        status, content_type, body = await fetch(server, "/metrics")
        assert status == 200
        assert content_type.startswith("text/plain; version=")
        return samples(body)

    found = await until(scrape, counted, timeout=10, what="alice's close counted")
    expected = {
        ("chat_connections", ()): 1.0,
        ("chat_frames_in_total", (("type", "join"),)): 3.0,
        ("chat_frames_in_total", (("type", "send"),)): 1.0,
        ("chat_messages_stored_total", ()): 1.0,
        ("chat_frames_out_total", (("type", "hello"),)): 2.0,
        ("chat_frames_out_total", (("type", "joined"),)): 2.0,
        # bob online, to alice; alice offline, to bob
        ("chat_frames_out_total", (("type", "presence"),)): 2.0,
        ("chat_frames_out_total", (("type", "ack"),)): 1.0,
        ("chat_frames_out_total", (("type", "message"),)): 2.0,
        ("chat_frames_out_total", (("type", "error"),)): 1.0,
        ("chat_errors_total", (("code", "not_found"),)): 1.0,
        ("chat_closes_total", (("code", "1000"),)): 1.0,
        ("chat_rate_limited_total", ()): 0.0,
        # One message broadcast, written to this process's two sockets once.
        ("chat_delivery_seconds_count", ()): 1.0,
    }
    assert {key: found.get(key) for key in expected} == expected
    assert found[("chat_delivery_seconds_bucket", (("le", "+Inf"),))] == 1.0
    await on_bob.close()


async def test_metrics_are_refused_to_addresses_outside_chat_metrics_allow(
    start_daphne,
):
    elsewhere = start_daphne(extra_env={"CHAT_METRICS_ALLOW": "10.0.0.0/8"})
    assert await fetch(elsewhere, "/metrics") == (
        403,
        "text/plain; charset=utf-8",
        "forbidden",
    )
    loopback = start_daphne(extra_env={"CHAT_METRICS_ALLOW": "10.0.0.0/8,127.0.0.1"})
    status, _, body = await fetch(loopback, "/metrics")
    assert status == 200
    assert "chat_connections 0.0" in body.splitlines()


async def test_json_logs_name_the_connection_and_log_each_request(
    start_daphne, chat_client
):
    server = start_daphne(extra_env={"CHAT_LOG_FORMAT": "json"})
    carol, key = await user_with_key("carol")
    # No subprotocol offered: the log names the one the server falls back on.
    socket = await chat_client(server, key, name="carol", subprotocols=[])
    connection_id = socket.hello["connection_id"]
    await socket.close()
    assert (await fetch(server, "/healthz"))[0] == 200

    def lines():
        found = []
        for line in server.output().splitlines():
            if line.startswith("{"):
                found.append(json.loads(line))
        return found

    def complete(found):
        messages = [line["message"] for line in found]
        return any(m.startswith("socket closed") for m in messages) and any(
            line.get("path") == "/healthz" for line in found
        )

    found = await until(lines, complete, timeout=10, what="the log lines")
    about_socket = [line for line in found if line["logger"] == "chat.consumers"]
    assert [line["message"] for line in about_socket] == [
        "socket open: token, chat.v1",
        about_socket[1]["message"],
    ]
    assert about_socket[1]["message"].startswith("socket closed: code 1000 after ")
    for line in about_socket:
        assert line["level"] == "INFO"
        assert (line["connection_id"], line["user"]) == (connection_id, "carol")
    (request,) = [line for line in found if line["logger"] == "chat.requests"]
    assert (request["method"], request["path"], request["status"]) == (
        "GET",
        "/healthz",
        200,
    )
    assert "connection_id" not in request
