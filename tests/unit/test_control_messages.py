"""Wire format of the control socket (sidusd.control.messages): encode/decode and refusals."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidusd.control import messages as m
from sidusd.errors import RemoteProtocolError


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# -- requests ------------------------------------------------------------------

def test_hosts_import_batch_is_checked_entry_by_entry():
    ok = {"mac": "52:54:00:00:00:01", "profile": "default"}
    with pytest.raises(RemoteProtocolError, match="hosts.import"):
        m.encode_request(m.OP_HOSTS_IMPORT, {"hosts": []})                  # an empty batch
    with pytest.raises(RemoteProtocolError, match=r"hosts\[1\]"):
        m.encode_request(m.OP_HOSTS_IMPORT, {"hosts": [ok, {"mac": "52:54:00:00:00:02"}]})
    with pytest.raises(RemoteProtocolError, match=r"hosts\[0\].*|profle"):
        m.encode_request(m.OP_HOSTS_IMPORT, {"hosts": [dict(ok, profle="x")]})
    with pytest.raises(RemoteProtocolError, match="too long"):
        m.encode_request(m.OP_HOSTS_IMPORT, {"hosts": [dict(ok, append="x" * 4000)] * 20})


def test_request_round_trip_every_op():
    samples = {
        m.OP_STATUS: {},
        m.OP_CLIENTS: {"mac": "52:54:00:00:00:01"},
        m.OP_HOSTS_LIST: {},
        m.OP_HOSTS_ADD: {"mac": "52:54:00:00:00:01", "profile": "default", "hostname": "vm1",
                         "image": None, "ip": "10.0.0.5", "append": "quiet"},
        m.OP_HOSTS_REMOVE: {"mac": "52:54:00:00:00:01"},
        m.OP_RELOAD: {},
        m.OP_HOSTS_DISK: {"mac": "52:54:00:00:00:01", "show_secret": True},
        m.OP_HOSTS_RESET_DISK: {"mac": "52:54:00:00:00:01"},
        m.OP_HOSTS_SHOW: {"mac": "52:54:00:00:00:01"},
        m.OP_HOSTS_SET: {"mac": "52:54:00:00:00:01", "append": "quiet", "unset": ["hostname", "ip"]},
        m.OP_HOSTS_ADOPT: {"mac": "52:54:00:00:00:01", "profile": "default", "hostname": "vm1"},
        m.OP_IMAGES_STATUS: {"name": "demo"},
        m.OP_HOSTS_IMPORT: {"hosts": [{"mac": "52:54:00:00:00:01", "profile": "default", "source": "f:1"}],
                            "replace": False},
        m.OP_HOSTS_CLEAR_CONFLICT: {"mac": "52:54:00:00:00:01"},
        m.OP_HOSTS_ROTATE_SECRET: {"mac": "52:54:00:00:00:01"},
    }
    assert set(samples) == set(m.OPS)
    for op, args in samples.items():
        data = m.encode_request(op, args)
        assert data.endswith(b"\n") and data.count(b"\n") == 1
        assert json.loads(data) == {"v": 1, "op": op, "args": args}
        assert m.decode_request(data) == m.Request(op, args)


def test_request_without_args_field_means_no_args():
    assert m.decode_request(b'{"v":1,"op":"status"}') == m.Request("status", {})


@pytest.mark.parametrize("obj, needle", [
    ({"v": 2, "op": "status"}, "unsupported protocol version 2"),
    ({"op": "status"}, "unsupported protocol version None"),
    ({"v": True, "op": "status"}, "unsupported protocol version True"),
    ({"v": "1", "op": "status"}, "unsupported protocol version '1'"),
    ({"v": 1}, "no 'op'"),
    ({"v": 1, "op": 7}, "no 'op'"),
    ({"v": 1, "op": "shutdown"}, "unknown op 'shutdown'"),
    ({"v": 1, "op": "status", "args": []}, "'args' must be a JSON object"),
    ({"v": 1, "op": "status", "args": {"x": 1}}, "unknown argument(s) x (allowed: none)"),
    ({"v": 1, "op": "status", "extra": 1}, "unknown request field(s): extra"),
    ({"v": 1, "op": "hosts.add", "args": {"mac": "52:54:00:00:00:01"}}, "missing argument 'profile'"),
    ({"v": 1, "op": "hosts.add", "args": {"mac": 5, "profile": "p"}}, "'mac' must be a string"),
    ({"v": 1, "op": "hosts.add", "args": {"mac": None, "profile": "p"}}, "'mac' must be a string"),
    ({"v": 1, "op": "hosts.add", "args": {"mac": "a", "profile": "p", "replace": True}},
     "unknown argument(s) replace (allowed: mac, profile, hostname, image, ip, append, persistent)"),
    ({"v": 1, "op": "hosts.add", "args": {"mac": "a", "profile": None}}, "'profile' must be a string"),
    ({"v": 1, "op": "hosts.add", "args": {"mac": "a", "profile": "p", "hostname": "x" * 5000}},
     "'hostname' is too long"),
    ({"v": 1, "op": "hosts.remove", "args": {}}, "missing argument 'mac'"),
    ({"v": 1, "op": "clients", "args": {"mac": ["x"]}}, "'mac' must be a string"),
    ({"v": 1, "op": "hosts.add", "args": {"mac": "a", "profile": "p", "persistent": "yes"}},
     "'persistent' must be true or false"),
    ({"v": 1, "op": "hosts.disk", "args": {"mac": "a", "show_secret": 1}}, "'show_secret' must be true or false"),
    ({"v": 1, "op": "hosts.set", "args": {"mac": "a", "unset": "hostname"}},
     "'unset' must be a short list of short strings"),
    ({"v": 1, "op": "hosts.set", "args": {"mac": "a", "unset": ["x"] * 9}},
     "'unset' must be a short list of short strings"),
    ({"v": 1, "op": "hosts.adopt", "args": {"mac": "a", "ip": "10.0.0.1"}},
     "unknown argument(s) ip (allowed: mac, profile, hostname, image, append)"),
    ({"v": 1, "op": "images.status", "args": {}}, "missing argument 'name'"),
])
def test_bad_requests_are_refused_with_a_clear_message(obj, needle):
    with pytest.raises(RemoteProtocolError) as exc:
        m.decode_request(line(obj))
    assert needle in str(exc.value)


@pytest.mark.parametrize("data, needle", [
    (b"not json\n", "not valid JSON"),
    (b"\n", "empty request"),
    (b"   \n", "empty request"),
    (b"[1,2]\n", "must be a JSON object, got list"),
    (b'"status"\n', "must be a JSON object, got str"),
    (b'{"v":1,"op":"st\xffatus"}\n', "not UTF-8"),
    (b"[" * 50000 + b"\n", "not valid JSON"),
])
def test_garbage_is_refused(data, needle):
    with pytest.raises(RemoteProtocolError) as exc:
        m.decode_request(data)
    assert needle in str(exc.value)


def test_oversized_request_refused_both_ways():
    big = line({"v": 1, "op": "status", "args": {}, "pad": "x" * m.MAX_REQUEST_BYTES})
    with pytest.raises(RemoteProtocolError, match="too long"):
        m.decode_request(big)
    # the client refuses to build one too: each arg is under its cap, but JSON
    # escapes every control character as 6 bytes
    esc = "\x01" * m.MAX_ARG_CHARS
    with pytest.raises(RemoteProtocolError, match="too long"):
        m.encode_request(m.OP_HOSTS_ADD, {"mac": esc, "profile": esc, "hostname": esc, "append": esc})


def test_request_exactly_at_the_cap_is_decoded():
    head = '{"v":1,"op":"hosts.remove","args":{"mac":"'
    # pad the JSON with spaces so the line is exactly MAX_REQUEST_BYTES long
    body = head + 'ab"}}'
    data = (body + " " * (m.MAX_REQUEST_BYTES - len(body))).encode()
    assert len(data) == m.MAX_REQUEST_BYTES
    assert m.decode_request(data) == m.Request("hosts.remove", {"mac": "ab"})
    with pytest.raises(RemoteProtocolError, match="too long"):
        m.decode_request(data + b" ")


def test_encode_request_validates_like_the_server():
    with pytest.raises(RemoteProtocolError, match="unknown op"):
        m.encode_request("nope")
    with pytest.raises(RemoteProtocolError, match="missing argument 'mac'"):
        m.encode_request(m.OP_HOSTS_REMOVE, {})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decode_request_raises_only_remote_protocol_error(data):
    try:
        req = m.decode_request(data)
    except RemoteProtocolError:
        return
    assert req.op in m.OPS


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                     max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "op", "args", "x"]), _json, max_size=4))
def test_decode_request_of_arbitrary_objects(obj):
    try:
        req = m.decode_request(json.dumps(obj).encode())
    except RemoteProtocolError:
        return
    assert obj["v"] == 1 and req.op == obj["op"] and req.op in m.OPS


@settings(max_examples=200, deadline=None)
@given(mac=st.text(max_size=40), profile=st.text(min_size=1, max_size=40),
       append=st.none() | st.text(max_size=100), ip=st.none() | st.text(max_size=20))
def test_hosts_add_round_trip(mac, profile, append, ip):
    args = {"mac": mac, "profile": profile, "append": append, "ip": ip}
    assert m.decode_request(m.encode_request(m.OP_HOSTS_ADD, args)) == m.Request(m.OP_HOSTS_ADD, args)


# -- responses -----------------------------------------------------------------

def test_response_round_trip():
    result = {"hosts": [{"mac": "52:54:00:00:00:01", "ip": None}], "n": 3}
    assert m.decode_response(m.encode_ok(result)) == m.Response(ok=True, result=result)
    assert m.decode_response(m.encode_ok(None)) == m.Response(ok=True, result=None)
    assert m.decode_response(m.encode_error("no such host")) == m.Response(ok=False, error="no such host")
    assert json.loads(m.encode_error("x")) == {"v": 1, "ok": False, "error": "x"}


def test_ok_response_stringifies_values_json_cannot_carry():
    import ipaddress
    data = m.encode_ok({"ip": ipaddress.IPv4Address("10.0.0.1")})
    assert json.loads(data)["result"] == {"ip": "10.0.0.1"}


@pytest.mark.parametrize("data, needle", [
    (b'{"v":1,"result":1}', "no boolean 'ok'"),
    (b'{"v":1,"ok":"yes"}', "no boolean 'ok'"),
    (b'{"v":1,"ok":false}', "without an 'error' string"),
    (b'{"v":3,"ok":true}', "unsupported protocol version 3"),
    (b'<html>', "not valid JSON"),
])
def test_bad_responses(data, needle):
    with pytest.raises(RemoteProtocolError) as exc:
        m.decode_response(data)
    assert needle in str(exc.value)


def test_default_socket_path_is_the_config_default():
    from sidusd.config import ControlConfig
    assert m.DEFAULT_SOCKET_PATH == str(ControlConfig().socket_path)
