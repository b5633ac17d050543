"""bench/tftpbig.py, its pure parts: the servers' order per case."""

from __future__ import annotations

import collections

from bench.tftpbig import case_order

SERVERS = ["sidusd", "dnsmasq", "tftpd-hpa", "atftpd"]


def test_every_server_comes_first_as_often_as_the_others():
    """In a fixed order sidusd always ran first, right after atftpd's N = 32 case; over any
    whole number of turns each server leads equally often, and sidusd no longer follows
    atftpd at every turn."""
    orders = [case_order(SERVERS, k) for k in range(3 * len(SERVERS))]
    assert all(sorted(o) == sorted(SERVERS) for o in orders)
    assert collections.Counter(o[0] for o in orders) == {s: 3 for s in SERVERS}
    follows = collections.Counter((a[-1], b[0]) for a, b in zip(orders, orders[1:], strict=False))
    assert follows[("atftpd", "sidusd")] < len(orders) - 1
    assert orders[0] == SERVERS and orders[1][0] == "dnsmasq"


def test_one_server_is_its_own_order():
    assert case_order(["sidusd"], 7) == ["sidusd"]
