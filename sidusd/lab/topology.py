"""The isolated boot-lab network: two network namespaces, a bridge, taps.

::

    netns sidus-site-<id>                 netns sidus-lab-<id>
    +-------------------+                 +------------------------------------+
    | site0 10.13.20.2  |---- veth -------| vsite0 --+                         |
    | dnsmasq (DHCP)    |                 |          br0 10.13.20.1 (sidusd,   |
    +-------------------+                 |          |    ganesha, rpcbind)    |
                                          | tap0 ----+---- qemu VM 1           |
                                          | tap1 ----+---- qemu VM 2           |
                                          +------------------------------------+

Everything lives inside namespaces this module creates; nothing touches the
host's own interfaces.  Names carry the prefix ``sidus-lab-`` / ``sidus-site-``
and the id ``<pid>x<random>`` of the process that made them, so
:func:`teardown_stale` can recognise and remove the leftovers of a run whose
process is gone (crash, SIGKILL).  :meth:`Topology.teardown` is idempotent.

Every ``ip`` call goes through :class:`sidusd.storage.runner.Runner` as an argv
list.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from sidusd.errors import StartupError
from sidusd.storage.runner import Runner

LAB_PREFIX = "sidus-lab-"
SITE_PREFIX = "sidus-site-"
NETWORK = ipaddress.IPv4Network("10.13.20.0/24")
SERVER_IP = "10.13.20.1"          # br0 in the lab namespace: the boot server
SITE_IP = "10.13.20.2"            # the site DHCP server's host
BRIDGE = "br0"
SITE_IF = "site0"                 # veth end inside the site namespace
LAB_VETH = "vsite0"               # veth end inside the lab namespace, on br0
IP_TIMEOUT_S = 15

_ID_RE = re.compile(r"^(?P<pid>\d+)x[0-9a-f]+$")


def _ip(runner: Runner, *argv: str, check: bool = True):
    res = runner.run(["ip", *argv], timeout_s=IP_TIMEOUT_S)
    if check:
        res.check()
    return res


def netns_list(runner: Runner | None = None) -> list[str]:
    """Names of the network namespaces that exist now (``ip netns list``)."""
    res = _ip(runner or Runner(), "netns", "list", check=False)
    return [line.split()[0] for line in res.out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_processes(runner: Runner, ns: str, grace_s: float = 5.0) -> list[int]:
    """Stop the processes still running inside ``ns`` (ones our lab started there).

    SIGTERM first, SIGKILL after ``grace_s``.  Returns the PIDs found.
    """
    res = _ip(runner, "netns", "pids", ns, check=False)
    pids = [int(p) for p in res.out.split() if p.isdigit() and int(p) != os.getpid()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if _pid_alive(p)]
        for p in alive:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if _pid_alive(p)]
        if not alive:
            break
    return pids


def _delete_netns(runner: Runner, ns: str) -> None:
    if ns in netns_list(runner):
        _kill_netns_processes(runner, ns)
        _ip(runner, "netns", "del", ns, check=False)


def teardown_stale(runner: Runner | None = None) -> list[str]:
    """Remove lab namespaces left by runs whose process no longer exists.

    A namespace is stale when its name is ``sidus-lab-<pid>x<rand>`` or
    ``sidus-site-<pid>x<rand>`` and process ``pid`` is gone.  Processes still
    inside it (a qemu, a dnsmasq of the dead run) are stopped first, so the
    devices inside really go away.  Returns the names removed.
    """
    runner = runner or Runner()
    removed = []
    for ns in netns_list(runner):
        for prefix in (LAB_PREFIX, SITE_PREFIX):
            if not ns.startswith(prefix):
                continue
            m = _ID_RE.match(ns[len(prefix):])
            if m and not _pid_alive(int(m["pid"])):
                _delete_netns(runner, ns)
                removed.append(ns)
    return removed


@dataclass
class Topology:
    """One lab network.  ``create()`` builds it, ``teardown()`` removes it all.

    ``with_site`` adds the site namespace and its veth link (proxyDHCP mode);
    without it (full-DHCP mode) the lab namespace stands alone.
    """

    with_site: bool = True
    lab_id: str = field(default_factory=lambda: f"{os.getpid()}x{secrets.token_hex(3)}")
    runner: Runner = field(default_factory=Runner)
    taps: list[str] = field(default_factory=list)
    created: bool = False

    @property
    def lab_ns(self) -> str:
        """Name of the lab namespace (bridge, boot server, VMs)."""
        return LAB_PREFIX + self.lab_id

    @property
    def site_ns(self) -> str:
        """Name of the site namespace (the IT department's DHCP server)."""
        return SITE_PREFIX + self.lab_id

    def lab_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside the lab namespace."""
        return ["ip", "netns", "exec", self.lab_ns, *argv]

    def site_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside the site namespace."""
        return ["ip", "netns", "exec", self.site_ns, *argv]

    def create(self) -> Topology:
        """Build the namespaces, bridge and veth link.  On failure, removes what it made."""
        prefix = NETWORK.prefixlen
        try:
            self.created = True
            _ip(self.runner, "netns", "add", self.lab_ns)
            lab = ("-n", self.lab_ns)
            _ip(self.runner, *lab, "link", "set", "lo", "up")
            _ip(self.runner, *lab, "link", "add", BRIDGE, "type", "bridge",
                "stp_state", "0", "forward_delay", "0")
            _ip(self.runner, *lab, "addr", "add", f"{SERVER_IP}/{prefix}", "dev", BRIDGE)
            _ip(self.runner, *lab, "link", "set", BRIDGE, "up")
            if self.with_site:
                _ip(self.runner, "netns", "add", self.site_ns)
                site = ("-n", self.site_ns)
                _ip(self.runner, *site, "link", "set", "lo", "up")
                _ip(self.runner, *lab, "link", "add", LAB_VETH, "type", "veth",
                    "peer", "name", SITE_IF, "netns", self.site_ns)
                _ip(self.runner, *lab, "link", "set", LAB_VETH, "master", BRIDGE)
                _ip(self.runner, *lab, "link", "set", LAB_VETH, "up")
                _ip(self.runner, *site, "addr", "add", f"{SITE_IP}/{prefix}", "dev", SITE_IF)
                _ip(self.runner, *site, "link", "set", SITE_IF, "up")
        except Exception as exc:
            self.teardown()
            raise StartupError(f"cannot build the lab network: {exc}") from exc
        return self

    def add_tap(self) -> str:
        """A new tap device on br0 for one VM (``tap0``, ``tap1``...); returns its name."""
        name = f"tap{len(self.taps)}"
        lab = ("-n", self.lab_ns)
        _ip(self.runner, *lab, "tuntap", "add", "dev", name, "mode", "tap")
        self.taps.append(name)
        _ip(self.runner, *lab, "link", "set", name, "master", BRIDGE)
        _ip(self.runner, *lab, "link", "set", name, "up")
        return name

    def teardown(self) -> None:
        """Stop what still runs inside, delete both namespaces.  Safe to call twice."""
        for ns in (self.site_ns, self.lab_ns):
            _delete_netns(self.runner, ns)
        self.taps.clear()
        self.created = False

    def exists(self) -> bool:
        """True while the lab namespace exists."""
        return self.lab_ns in netns_list(self.runner)

    def __enter__(self) -> Topology:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.teardown()
