"""Property-based fuzzing: no input ends in a traceback, a 1011 or a dead consumer."""

import asyncio
import json
import struct

import pytest
from channels.testing import WebsocketCommunicator
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat import fanout, policies, presence, protocol, registry, services
from chat.protocol import ChatError

REFUSAL_CODES = {"bad_request", "too_large"}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["room", "since", "before", "limit", "body", "client_msg_id", "id", "seq", "to"]
    + ["ref", "type"]
)
frame_types = st.sampled_from([*protocol.CLIENT_FRAMES, "fly", "", None, 7])
frames = st.builds(
    lambda frame_type, fields: {**fields, "type": frame_type},
    frame_types,
    st.dictionaries(field_names, json_values | st.just("lobby"), max_size=6),
)
surrogate_text = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=0xFFFF), max_size=30
)


def outcome(parse, data):
    """The frame a parse gives, or the error frame the client would get."""
    try:
        return parse(data)
    except ChatError as exc:
        assert exc.code in REFUSAL_CODES, exc.code
        encoded = protocol.encode(protocol.error_from(exc))
        assert json.loads(encoded.text)["code"] == exc.code
        return None


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_any_text_parses_or_is_refused_cleanly(text):
    frame = outcome(protocol.parse_json, text)
    assert frame is None or isinstance(frame, protocol.ClientFrame)


@settings(max_examples=400, deadline=None)
@given(frames)
def test_any_json_object_parses_or_is_refused_cleanly(frame):
    parsed = outcome(protocol.parse_json, json.dumps(frame))
    if parsed is not None:
        assert parsed.type == frame["type"]


@settings(max_examples=200, deadline=None)
@given(surrogate_text)
def test_any_escaped_code_point_in_a_field_parses_or_is_refused(text):
    raw = json.dumps(
        {"type": "send", "room": "lobby", "body": text, "client_msg_id": "c"}
    )
    parsed = outcome(protocol.parse_json, raw)
    if parsed is not None:
        assert parsed.body == text and "\x00" not in text


@settings(max_examples=400, deadline=None)
@given(
    st.integers(min_value=0, max_value=40)
    | st.integers(min_value=0, max_value=2**32 - 1),
    st.binary(max_size=120) | frames.map(lambda f: json.dumps(f).encode()),
)
def test_any_binary_frame_parses_or_is_refused_cleanly(code, payload):
    frame = outcome(protocol.parse_binary, struct.pack(">I", code) + payload)
    assert frame is None or isinstance(frame, protocol.ClientFrame)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3))
def test_binary_frames_shorter_than_their_code_are_refused(data):
    assert outcome(protocol.parse_binary, data) is None


# --- through the real application --------------------------------------------------


@pytest.fixture
def loop():
    """One event loop for every example, its per-loop state dropped at the end."""
    loop = asyncio.new_event_loop()
    yield loop

    async def drop():
        await presence.stop_keeper()
        await policies.stop_idle_watch()
        await fanout.stop_hub()
        await presence.reset_store()
        await registry.reset_registry()
        await services.token_uses_reset()

    loop.run_until_complete(drop())
    loop.close()


@pytest.fixture
def fuzz_key(make_user):
    """A user's token and the room ``lobby``, once for all the examples."""
    services.room_create(slug="lobby", title="Lobby")
    return services.api_token_create(user=make_user("fuzz"))[1]


@pytest.mark.django_db(transaction=True)
@settings(
    max_examples=120,
    deadline=None,
    # The fixtures are made once for all examples, on purpose: one user, one room.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    frame=frames
    | surrogate_text.map(lambda t: {"type": "send", "room": "lobby", "body": t})
    | surrogate_text.map(lambda t: {"type": "leave", "room": "nope", "ref": t})
)
def test_any_frame_gets_an_answer_and_leaves_the_socket_usable(loop, fuzz_key, frame):
    loop.run_until_complete(_frame_answered(fuzz_key, frame))


async def _frame_answered(key, frame):
    from chatsite.asgi import application

    communicator = WebsocketCommunicator(application, f"/ws/?token={key}")
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from(timeout=3))["type"] == "hello"
    await communicator.send_to(text_data=json.dumps({"ref": "fuzz", **frame}))
    await communicator.send_to(text_data='{"type":"ping","ref":"alive"}')
    # Whatever the frame did (an error, a join, an ack, messages), the socket
    # answers the ping after it and is never closed.
    for _ in range(20):
        output = await communicator.receive_output(timeout=3)
        assert output["type"] == "websocket.send", output
        reply = json.loads(output["text"])
        if reply.get("code") is not None:
            assert reply["code"] in REFUSAL_CODES | {
                "not_found",
                "not_joined",
                "forbidden",
            }, reply
        if reply == {"type": "pong", "ref": "alive"}:
            break
    else:
        raise AssertionError("no pong after the frame")
    await communicator.disconnect()
