"""The supervisor's decoding of what the (possibly compromised) worker sends: sidusd/privsep/ipc.py."""

from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidusd import config
from sidusd.boot import inventory
from sidusd.errors import RemoteProtocolError
from sidusd.privsep import ipc
from sidusd.privsep.channel import refusal_code
from sidusd.runtime import Snapshot


def enc(obj) -> bytes:
    return json.dumps(obj).encode()


def test_good_messages_come_out_clean():
    m = ipc.decode_worker(enc({"t": "events", "counters": {"tftp.rx": 3, "tftp.retransmits": 0},
                               "events": [["seen", "52:54:00:00:00:01", "10.0.0.5", "efi-x64"],
                                          ["tl", "52:54:00:00:00:01", 12.5, "tftp", {"file": "a", "bytes": 5,
                                                                                    "duration_s": 0.1, "x": None}],
                                          ["booted", "52:54:00:00:00:01", "demo", None]],
                               "dropped": 2}))
    assert m.t == "events" and m.body["counters"] == {"tftp.rx": 3, "tftp.retransmits": 0}
    assert m.body["events"][0] == ("seen", "52:54:00:00:00:01", "10.0.0.5", "efi-x64")
    assert m.body["events"][1][4] == {"file": "a", "bytes": 5, "duration_s": 0.1, "x": None}
    assert m.body["dropped"] == 2
    assert ipc.decode_worker(enc({"t": "hello", "pid": 42})).body == {"pid": 42}
    s = ipc.decode_worker(enc({"t": "stats", "id": 7, "transfers": {"tftp": 1},
                               "listeners": {"tftp": [{"proto": "udp", "port": 69}]}}))
    assert s.body == {"id": 7, "transfers": {"tftp": 1}, "listeners": {"tftp": [{"proto": "udp", "port": 69}]},
                      "active": []}


@pytest.mark.parametrize("data, reason", [
    (b"{" + b" " * ipc.MAX_MSG + b"}", "oversized"),
    (b"{not json", "bad_json"),
    (b"\xff\xfe{}", "bad_json"),
    (pickle.dumps({"t": "hello"}), "bad_json"),
    (b'{"t": "hello", "t": "hello", "pid": 1}', "bad_json"),
    (b'{"t": "events", "counters": {"x": NaN}}', "bad_json"),
    (b'{"t": "events", "counters": {"x": Infinity}}', "bad_json"),
    (b"[1]", "bad_json"),
    (b"[" * 10_000 + b"]" * 10_000, "bad_json"),                  # deep nesting
    (b'{"t": "pwn"}', "unknown_type"),
    (b'{"pid": 1}', "unknown_type"),
    (b'{"t": "hello", "pid": 0}', "bad_field"),
    (b'{"t": "hello", "pid": true}', "bad_field"),
    (b'{"t": "hello", "pid": 5, "uid": 0}', "bad_field"),
    (b'{"t": "events", "counters": {"../x": 1}}', "bad_field"),
    (b'{"t": "events", "counters": {"x": -1}}', "bad_field"),
    (b'{"t": "events", "counters": {"x": 1.5}}', "bad_field"),
    (b'{"t": "events", "counters": {"x": 4294967296}}', "bad_field"),
    (b'{"t": "events", "events": [["seen", "not-a-mac", null, null]]}', "bad_field"),
    (b'{"t": "events", "events": [["seen", "52:54:00:00:00:01", "999.1.1.1", null]]}', "bad_field"),
    (b'{"t": "events", "events": [["seen", "52:54:00:00:00:01", null, "BIOS!"]]}', "bad_field"),
    (b'{"t": "events", "events": [["tl", "52:54:00:00:00:01", 1, "e", {"event": "x"}]]}', "bad_field"),
    (b'{"t": "events", "events": [["tl", "52:54:00:00:00:01", 1, "e", {"a": [1]}]]}', "bad_field"),
    (b'{"t": "events", "events": [["tl", "52:54:00:00:00:01", 1, "e", {"a": {"b": 1}}]]}', "bad_field"),
    (b'{"t": "events", "events": [["rm", "-rf"]]}', "bad_field"),
    (b'{"t": "events", "events": "x"}', "bad_field"),
    (b'{"t": "fatal", "error": 5}', "bad_field"),
    (b'{"t": "ready", "listeners": {"tftp": "x"}}', "bad_field"),
])
def test_hostile_messages_are_refused_with_a_reason(data, reason):
    if len(data) > ipc.MAX_MSG:
        assert reason == "oversized"
    with pytest.raises(RemoteProtocolError) as exc:
        ipc.decode_worker(data)
    assert refusal_code(exc.value) == reason, str(exc.value)


def test_event_and_string_bounds():
    many = {"t": "events", "events": [["seen", "52:54:00:00:00:01", None, None]] * (ipc.MAX_EVENTS + 1)}
    with pytest.raises(RemoteProtocolError):
        ipc.decode_worker(enc(many))
    with pytest.raises(RemoteProtocolError):
        ipc.decode_worker(enc({"t": "fatal", "error": "x" * (ipc.MAX_STR + 1)}))
    big = {f"f{i}": "x" * 100 for i in range(11)}                       # > MAX_ENTRY as JSON
    with pytest.raises(RemoteProtocolError):
        ipc.decode_worker(enc({"t": "events", "events": [["tl", "52:54:00:00:00:01", 1, "e", big]]}))
    fields = {f"f{i}": i for i in range(ipc.MAX_FIELDS + 1)}
    with pytest.raises(RemoteProtocolError):
        ipc.decode_worker(enc({"t": "events", "events": [["tl", "52:54:00:00:00:01", 1, "e", fields]]}))


@pytest.mark.parametrize("parts", [[], [".."], ["."], ["a/b"], ["a\x00b"], [""], [1], ["x" * 256],
                                   ["a"] * (ipc.MAX_PARTS + 1), "images"])
def test_open_requests_name_plain_components_only(parts):
    with pytest.raises(RemoteProtocolError):
        ipc.decode_rpc(enc({"t": "open", "id": 1, "parts": parts}))


def test_rpc_requests():
    r = ipc.decode_rpc(enc({"t": "open", "id": 3, "parts": ["images", "demo", "vmlinuz"]}))
    assert (r.t, r.id, r.body) == ("open", 3, {"parts": ("images", "demo", "vmlinuz")})
    lease = {"ip": "10.0.0.5", "mac": "52:54:00:00:00:01", "state": "bound", "expires": 100.0}
    r = ipc.decode_rpc(enc({"t": "lease.append", "id": 4, "lease": lease}))
    assert r.body == lease
    for bad in ({**lease, "state": "offered"}, {**lease, "ip": "x"}, {**lease, "extra": 1},
                {**lease, "expires": "soon"}, {**lease, "mac": "AA"}):
        with pytest.raises(RemoteProtocolError):
            ipc.decode_rpc(enc({"t": "lease.append", "id": 4, "lease": bad}))
    with pytest.raises(RemoteProtocolError):
        ipc.decode_rpc(enc({"t": "lease.load", "id": 5, "path": "/etc/shadow"}))
    with pytest.raises(RemoteProtocolError):
        ipc.decode_rpc(enc({"t": "open", "parts": ["a"]}))            # no id


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_the_protocol_error(data):
    for decode in (ipc.decode_worker, ipc.decode_rpc):
        try:
            decode(data)
        except RemoteProtocolError:
            pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ipc.WORKER_TYPES + ("x",)), st.dictionaries(st.sampled_from(
    ["pid", "error", "listeners", "counters", "events", "dropped", "id", "transfers", "z"]), json_values, max_size=4))
def test_random_json_messages_raise_only_the_protocol_error(t, body):
    try:
        ipc.decode_worker(enc({"t": t, **body}))
    except RemoteProtocolError:
        pass


def test_snapshots_cross_in_chunks_and_come_back_equal():
    text = ("dhcp: {mode: off}\ntftp: {root: /srv/tftp}\n"
            "images: {demo: {root: /srv/img, kernel: k, initrd: i}}\n")
    cfg = config.parse(text)
    hosts = [{"mac": f"52:54:00:00:{i // 256:02x}:{i % 256:02x}", "hostname": f"n{i}", "profile": "default"}
             for i in range(3000)]
    import yaml
    inv = inventory.parse_inventory(yaml.safe_dump(
        {"profiles": {"default": {"image": "demo", "overlay": "tmpfs", "append": ""}}, "hosts": hosts}), "inv")
    snap = Snapshot(cfg, inv, 7)
    frames = ipc.encode_parent(("snapshot", snap, None))
    assert len(frames) > 1 and all(len(f) <= ipc.CHUNK + 1 for f in frames)
    r = ipc.Reassembler()
    outs = [r.feed(f) for f in frames]
    assert outs[:-1] == [None] * (len(frames) - 1)
    kind, back, disks = outs[-1]
    assert kind == "snapshot" and disks is None and back == snap
    assert back.config.images["demo"].kernel == "k" and len(back.inventory.hosts) == 3000


def test_a_restarted_worker_keeps_the_bound_listener_keys_from_the_one_table():
    """supervisor.pinned_config: every key of config._listener_items that changed (via
    restart_needed) is put back as bound; anything else comes from the new config."""
    import dataclasses

    from sidusd import config
    from sidusd.privsep.supervisor import pinned_config

    bound = config.parse("dhcp:\n  mode: \"off\"\ntftp:\n  root: /srv/tftp\n  port: 6969\n"
                         "http:\n  enabled: true\n  port: 8080\n")
    new = dataclasses.replace(
        bound, tftp=dataclasses.replace(bound.tftp, port=7070, max_transfers=7),
        http=dataclasses.replace(bound.http, port=9090),
        log=dataclasses.replace(bound.log, level="debug"))
    assert config.restart_needed(bound, new) == ["tftp.port", "http.port"]
    got = pinned_config(bound, new)
    assert got.tftp.port == 6969 and got.http.port == 8080          # as bound
    assert got.tftp.max_transfers == 7 and got.log.level == "debug"   # as reloaded
    assert config.restart_needed(bound, got) == []
    assert pinned_config(bound, bound) is bound
