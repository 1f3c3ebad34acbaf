"""The declared wire schemas: client frames, server frames, both framings."""

import json
import struct
from datetime import UTC, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from chat import protocol
from chat.protocol import ChatError

MAX_SAFE = 2**53 - 1


def refusal(text):
    """(code, message, extra) of the ChatError a JSON text frame gets."""
    with pytest.raises(ChatError) as excinfo:
        protocol.parse_json(text)
    return excinfo.value.code, excinfo.value.message, excinfo.value.extra


# --- client frames ---------------------------------------------------------------


def test_a_send_decodes_into_its_schema_and_ignores_unknown_fields():
    frame = protocol.parse_json(
        '{"type":"send","room":"lobby","body":"hi","client_msg_id":"c1",'
        '"ref":"r","colour":"blue","nested":{"a":[1,2]}}'
    )
    assert frame == protocol.Send(room="lobby", body="hi", client_msg_id="c1", ref="r")
    assert frame.type == "send"


def test_optional_fields_default_and_accept_null():
    assert protocol.parse_json('{"type":"join","room":"lobby"}') == protocol.Join(
        room="lobby", since=None
    )
    assert (
        protocol.parse_json('{"type":"join","room":"lobby","since":null}').since is None
    )
    page = protocol.parse_json('{"type":"history","room":"lobby","limit":null}')
    assert (page.before, page.limit) == (None, 50)


def test_every_client_type_has_a_schema_and_a_binary_code():
    assert sorted(protocol.CLIENT_FRAMES) == [
        "delete",
        "dm",
        "edit",
        "history",
        "join",
        "leave",
        "ping",
        "react",
        "read",
        "rooms",
        "search",
        "send",
        "typing",
    ]
    for name, cls in protocol.CLIENT_FRAMES.items():
        assert cls.type == name
        assert protocol.FRAME_TYPES[protocol.FRAME_CODES[name]] == name


def test_the_largest_safe_integer_is_accepted():
    frame = protocol.parse_json(f'{{"type":"read","room":"lobby","seq":{MAX_SAFE}}}')
    assert frame.seq == MAX_SAFE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f'{{"type":"join","room":"lobby","since":{MAX_SAFE + 1}}}',
            "join: Expected `int` <= 9007199254740991 - at `$.since`",
        ),
        (
            '{"type":"join","room":"lobby","since":-1}',
            "join: Expected `int` >= 0 - at `$.since`",
        ),
        (
            '{"type":"join","room":"lobby","since":1.5}',
            "join: Expected `int | null`, got `float` - at `$.since`",
        ),
        (
            '{"type":"join","room":"lobby","since":true}',
            "join: Expected `int | null`, got `bool` - at `$.since`",
        ),
        (
            '{"type":"join","room":"lobby","since":"3"}',
            "join: Expected `int | null`, got `str` - at `$.since`",
        ),
        (
            '{"type":"edit","room":"lobby","id":0,"body":"x"}',
            "edit: Expected `int` >= 1 - at `$.id`",
        ),
        (
            '{"type":"history","room":"lobby","limit":101}',
            "history: Expected `int` <= 100 - at `$.limit`",
        ),
        (
            '{"type":"send","room":"bad slug!","body":"x","client_msg_id":"c"}',
            "send: Expected `str` matching regex '^[-a-zA-Z0-9_]{1,64}$' - at `$.room`",
        ),
        (
            '{"type":"send","room":"lobby","body":"","client_msg_id":"c"}',
            "send: Expected `str` of length >= 1 - at `$.body`",
        ),
        (
            '{"type":"send","room":"lobby","body":"x"}',
            "send: Object missing required field `client_msg_id`",
        ),
        (
            '{"type":"dm","to":"' + "u" * 151 + '","body":"x","client_msg_id":"c"}',
            "dm: Expected `str` of length <= 150 - at `$.to`",
        ),
    ],
)
def test_a_field_out_of_its_declared_range_is_bad_request_with_the_ref(text, message):
    text = text[:-1] + ',"ref":"q"}'
    assert refusal(text) == ("bad_request", message, {"ref": "q"})


def test_a_body_over_4000_characters_is_too_large():
    body = "x" * 4001
    text = json.dumps(
        {
            "type": "send",
            "room": "lobby",
            "body": body,
            "client_msg_id": "c",
            "ref": "b",
        }
    )
    assert refusal(text) == (
        "too_large",
        "body is longer than 4000 characters",
        {"ref": "b"},
    )


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ('{"type":"fly","ref":"f"}', ("unknown frame type 'fly'", {"ref": "f"})),
        ('{"room":"lobby","ref":"f"}', ("frame needs a type", {"ref": "f"})),
        ("[1, 2]", ("frame must be a JSON object", {})),
        ('"text"', ("frame must be a JSON object", {})),
        ("not json", ("frame is not valid JSON", {})),
        ("{", ("frame is not valid JSON", {})),
        (
            '{"type":"ping","ref":"' + "r" * 65 + '"}',
            ("ref must be a string of at most 64", {}),
        ),
        ('{"type":"ping","ref":5}', ("ref must be a string of at most 64", {})),
    ],
)
def test_frames_that_are_no_known_object_are_bad_request(text, answer):
    assert refusal(text) == ("bad_request", *answer)


def test_a_lone_surrogate_escape_is_bad_request():
    assert refusal('{"type":"ping","ref":"\\ud800"}') == (
        "bad_request",
        "frame is not valid JSON",
        {},
    )


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (
            {"type": "send", "room": "l", "body": "x\x00", "client_msg_id": "c"},
            "send: body must not contain NUL characters",
        ),
        (
            {"type": "send", "room": "l", "body": "x", "client_msg_id": "\x00"},
            "send: client_msg_id must not contain NUL characters",
        ),
        (
            {"type": "edit", "room": "l", "id": 1, "body": "\x00"},
            "edit: body must not contain NUL characters",
        ),
        (
            {"type": "dm", "to": "a\x00", "body": "x", "client_msg_id": "c"},
            "dm: to must not contain NUL characters",
        ),
    ],
)
def test_text_the_database_cannot_store_is_bad_request(frame, message):
    assert refusal(json.dumps({**frame, "ref": "n"})) == (
        "bad_request",
        message,
        {"ref": "n"},
    )


@pytest.mark.parametrize("field", ["body", "client_msg_id", "ref"])
def test_a_lone_surrogate_in_any_field_is_bad_request(field):
    frame = {"type": "send", "room": "l", "body": "x", "client_msg_id": "c"}
    text = json.dumps({**frame, field: "x\ud800"})
    assert "\\ud800" in text
    assert refusal(text) == ("bad_request", "frame is not valid JSON", {})


def test_deeply_nested_json_is_bad_request():
    text = '{"type":"ping","x":' + "[" * 30_000 + "]" * 30_000 + "}"
    assert refusal(text) == ("bad_request", "frame is not valid JSON", {})


def test_deeply_nested_json_in_a_binary_frame_is_bad_request():
    data = struct.pack(">I", 11) + b'{"x":' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    with pytest.raises(ChatError) as excinfo:
        protocol.parse_binary(data)
    assert (excinfo.value.code, excinfo.value.message) == (
        "bad_request",
        "binary frame payload is not valid JSON",
    )


def test_invalid_utf8_in_a_binary_frame_is_bad_request():
    with pytest.raises(ChatError) as excinfo:
        protocol.parse_binary(struct.pack(">I", 11) + b'{"ref":"\xff"}')
    assert (excinfo.value.code, excinfo.value.message) == (
        "bad_request",
        "binary frame payload is not valid JSON",
    )


def test_a_binary_frame_takes_its_type_from_the_action_code():
    data = struct.pack(">I", 2) + b'{"room":"lobby","since":4,"ref":"j"}'
    assert protocol.parse_binary(data) == protocol.Join(room="lobby", since=4, ref="j")
    assert protocol.parse_binary(struct.pack(">I", 11)) == protocol.Ping()


@pytest.mark.parametrize(
    ("data", "answer"),
    [
        (b"\x00\x00", ("binary frame is shorter than its 4-byte code", {})),
        (struct.pack(">I", 99) + b"{}", ("unknown action code 99", {})),
        (struct.pack(">I", 3) + b"{}", ("unknown action code 3", {})),
        (struct.pack(">I", 2) + b"{", ("binary frame payload is not valid JSON", {})),
        (
            struct.pack(">I", 2) + b'{"ref":"r"}',
            ("join: Object missing required field `room`", {"ref": "r"}),
        ),
    ],
)
def test_bad_binary_frames_are_bad_request(data, answer):
    with pytest.raises(ChatError) as excinfo:
        protocol.parse_binary(data)
    error = excinfo.value
    assert (error.code, error.message, error.extra) == ("bad_request", *answer)


# --- server frames ---------------------------------------------------------------

AUTHOR = SimpleNamespace(pk=7, get_username=lambda: "alice")
STORED = SimpleNamespace(
    pk=1234,
    seq=99,
    body="hi",
    client_msg_id="c1",
    created_at=datetime(2026, 12, 2, 12, 0, 0, 123456, tzinfo=UTC),
    edited_at=None,
    deleted_at=None,
    mention_names=["bob"],
    reaction_summary=[{"emoji": "👍", "count": 2, "users": ["bob", "carol"]}],
    reply_to_id=1200,
    reply_count=0,
    attachment_summary=[],
)
MESSAGE_JSON = (
    '{"type":"message","room":"lobby","id":1234,"seq":99,'
    '"user":{"id":7,"username":"alice"},"body":"hi",'
    '"created_at":"2026-12-02T12:00:00.123Z","client_msg_id":"c1",'
    '"edited_at":null,"deleted":false,"mentions":["bob"],'
    '"reactions":[{"emoji":"👍","count":2,"users":["bob","carol"]}],'
    '"reply_to":1200,"reply_count":0,"attachments":[]}'
)


def test_a_message_frame_encodes_with_type_first_and_every_field():
    frame = protocol.message(protocol.message_payload(STORED, "lobby", AUTHOR))
    assert protocol.encode(frame).text == MESSAGE_JSON


def test_the_binary_framing_is_the_action_code_and_the_fields_without_type():
    frame = protocol.message(protocol.message_payload(STORED, "lobby", AUTHOR))
    payload = '{"room"' + MESSAGE_JSON[len('{"type":"message","room"') :]
    assert protocol.encode(frame).binary == struct.pack(">I", 8) + payload.encode()


def test_a_frame_received_as_text_only_gets_the_same_binary_from_its_schema():
    frames = [
        protocol.message(protocol.message_payload(STORED, "lobby", AUTHOR)),
        protocol.pong(ref="p"),
        protocol.pong(ref=None),
        protocol.push(event="e", data={"nested": [1, None]}),
        protocol.error(code="rate_limited", message="slow down", retry_after=1.5),
    ]
    for frame in frames:
        local = protocol.encode(frame)
        relayed = protocol.Encoded(local.type, local.text)
        assert relayed.binary == local.binary


def test_an_unset_ref_is_left_out_and_a_set_one_comes_last():
    assert protocol.encode(protocol.pong(ref=None)).text == '{"type":"pong"}'
    assert protocol.encode(protocol.pong(ref=None)).binary == struct.pack(">I", 12) + (
        b"{}"
    )
    ack = protocol.ack(ref="r", room_slug="lobby", message=STORED)
    assert protocol.encode(ack).text == (
        '{"type":"ack","room":"lobby","client_msg_id":"c1","id":1234,"seq":99,'
        '"ref":"r"}'
    )


def test_null_valued_required_fields_are_kept():
    edited = SimpleNamespace(pk=5, seq=2, body="b", edited_at=None, mention_names=[])
    frame = protocol.message_edited(room_slug="lobby", message=edited)
    assert json.loads(protocol.encode(frame).binary[4:]) == {
        "room": "lobby",
        "id": 5,
        "seq": 2,
        "body": "b",
        "edited_at": None,
        "mentions": [],
    }


def test_an_error_carries_its_extras_before_the_ref():
    error = ChatError("rate_limited", "slow down", retry_after=2.0, ref="x")
    assert protocol.encode(protocol.error_from(error)).text == (
        '{"type":"error","code":"rate_limited","message":"slow down",'
        '"retry_after":2.0,"ref":"x"}'
    )


def test_a_history_page_holds_messages_without_type():
    payload = protocol.message_payload(STORED, "lobby", AUTHOR)
    page = protocol.history(
        room_slug="lobby", messages=[payload], has_more=False, ref=None
    )
    message = json.loads(MESSAGE_JSON)
    del message["type"]
    assert json.loads(protocol.encode(page).text) == {
        "type": "history",
        "room": "lobby",
        "messages": [message],
        "has_more": False,
    }


def test_every_server_type_has_a_binary_code():
    for name in protocol.SERVER_FRAMES:
        assert protocol.FRAME_TYPES[protocol.FRAME_CODES[name]] == name


def test_timestamps_are_utc_with_milliseconds_and_a_z():
    plus_two = timezone(timedelta(hours=2))
    assert protocol.timestamp(datetime(2026, 1, 2, 3, 4, 5, 6789, plus_two)) == (
        "2026-01-02T01:04:05.006Z"
    )
    assert protocol.timestamp(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == (
        "2026-01-02T03:04:05.000Z"
    )
    assert protocol.timestamp(None) is None


# --- the push API body -------------------------------------------------------------


def test_a_push_request_names_one_target():
    request = protocol.parse_push_request(b'{"event":"e","data":null,"room":"lobby"}')
    assert request.target() == ("room", "lobby")
    assert (request.event, request.data) == ("e", None)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "the body is not valid JSON"),
        (b"[1]", "the body must be a JSON object with 'event' and 'data'"),
        (b'{"data":1,"all":true}', "the body needs an 'event' string"),
        (b'{"event":5,"data":1,"all":true}', "the body needs an 'event' string"),
        (b'{"event":"e","all":true}', "the body needs 'data' (any JSON)"),
        (b'{"event":"e","data":1,"user":""}', "'user' must be a username"),
        (b'{"event":"e","data":1,"user":"a\\u0000"}', "'user' must be a username"),
        (
            b'{"event":"e","data":1,"room":7}',
            "'room' must be a room slug (letters, digits, - and _)",
        ),
        (
            b'{"event":"e","data":1,"connection_id":"abc"}',
            "'connection_id' must be a connection id as hello gives it",
        ),
        (b'{"event":"e","data":1,"all":"yes"}', "'all' must be true"),
    ],
)
def test_a_bad_push_body_says_what_is_wrong(body, message):
    with pytest.raises(ChatError) as excinfo:
        protocol.parse_push_request(body)
    assert (excinfo.value.code, excinfo.value.message) == ("bad_request", message)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"event":"e","data":1}',
            "name exactly one target: user, room, connection_id, all",
        ),
        (
            b'{"event":"e","data":1,"user":"a","room":"b"}',
            "name exactly one target: user, room, connection_id, all",
        ),
        (b'{"event":"e","data":1,"all":false}', "'all' must be true"),
    ],
)
def test_a_push_body_without_exactly_one_target_is_refused(body, message):
    request = protocol.parse_push_request(body)
    with pytest.raises(ChatError) as excinfo:
        request.target()
    assert (excinfo.value.code, excinfo.value.message) == ("bad_request", message)


def test_gzip_framings_compress_only_frames_whose_json_is_over_1024_bytes():
    import gzip as gzip_module

    short = protocol.Encoded("pong", '{"type":"pong","ref":"' + "r" * 1000 + '"}')
    assert len(short.text) == 1024
    assert short.wire(protocol.FRAMING_JSON_GZIP) == (short.text.encode(), False)
    long_ = protocol.Encoded("pong", '{"type":"pong","ref":"' + "r" * 1001 + '"}')
    payload, binary = long_.wire(protocol.FRAMING_JSON_GZIP)
    assert binary is True
    assert gzip_module.decompress(payload) == long_.text.encode()
    # Uncompressed framings are untouched at any size.
    assert long_.wire(protocol.FRAMING_JSON) == (long_.text.encode(), False)
    assert long_.wire(protocol.FRAMING_BINARY) == (long_.binary, True)
    # chat.v1.bin: the JSON without type counts; the code gets the high bit.
    fields = long_.binary[4:]
    assert len(fields) == 1011  # {"ref":"rrr…"}: under the threshold
    assert long_.wire(protocol.FRAMING_BINARY_GZIP) == (long_.binary, True)
    longer = protocol.Encoded("pong", '{"type":"pong","ref":"' + "r" * 1020 + '"}')
    payload, binary = longer.wire(protocol.FRAMING_BINARY_GZIP)
    assert binary is True
    assert payload[:4] == (0x80000000 | protocol.FRAME_CODES["pong"]).to_bytes(4)
    assert gzip_module.decompress(payload[4:]) == longer.binary[4:]
    # The same frame compresses to the same bytes (no time in the header).
    assert protocol.Encoded(longer.type, longer.text).wire(3) == (payload, True)
