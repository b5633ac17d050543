"""The shared state's edge without a database: client events into the bounded queue, the
counters the metrics read, the start refused without PostgreSQL nor local copy, the local copy."""

import pytest

from sidusd import config
from sidusd.errors import StartupError
from sidusd.observability import Observer
from sidusd.state import localcopy
from sidusd.state import snapshot as S

pytest.importorskip("psycopg", reason="missing tool: psycopg (pip, pyproject test extra)")

from sidusd.state.service import StateService  # noqa: E402


def cfg(tmp_path, **state):
    text = ("dhcp: {mode: off}\ntftp: {root: /srv/tftp}\n"
            f"state_dir: {tmp_path}\n"
            "images: {demo: {root: /srv/img/demo, kernel: k, initrd: i}}\n"
            "state: {backend: postgresql, dsn: 'host=%s/nosuch port=5 user=x connect_timeout=1', "
            "queue_max: 3, server_name: r1}\n" % tmp_path)
    return config.parse(text)


class FakeRuntime:
    def __init__(self):
        self.observer = Observer(clock=lambda: 100.0)
        self.backend_status = {}


def test_client_events_are_queued_bounded_and_counted(tmp_path):
    svc = StateService(cfg(tmp_path))
    rt = FakeRuntime()
    svc._runtime = rt
    rt.observer.listeners.append(svc.note_client)
    for i in range(5):
        rt.observer.timeline("52:54:00:00:00:01", "dhcp.offer", ip=f"10.0.0.{i}")
    assert len(svc.queue) == 3
    assert rt.observer.counters["state.events.queued"] == 5
    assert rt.observer.counters["state.events.dropped"] == 2
    assert rt.backend_status["state"]["queue"] == {"depth": 3, "bound": 3, "queued": 5, "sent": 0, "dropped": 2}
    batch = svc.queue.take(0.0)
    assert [e["body"]["ip"] for e in batch] == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]   # the newest kept
    assert batch[0]["kind"] == "dhcp.offer" and batch[0]["server"] == "r1" and batch[0]["t"] == 100.0


def test_start_without_database_uses_the_local_copy_or_refuses(tmp_path):
    svc = StateService(cfg(tmp_path))
    with pytest.raises(StartupError) as e:
        svc.open()
    assert "no local copy" in str(e.value) and str(tmp_path / "state-snapshot.json") in str(e.value)
    snap = S.StateSnapshot(revision=9, profiles={"default": {"image": "demo"}},
                           hosts=[{"mac": "52:54:00:00:00:01", "profile": "default", "append": "m=1"}])
    localcopy.write(tmp_path / "state-snapshot.json", snap)
    assert oct((tmp_path / "state-snapshot.json").stat().st_mode & 0o777) == "0o600"
    svc.open()
    assert svc.source == "local_copy" and svc.current == snap and not svc.connected
    c, inv = svc.inventory_source(cfg(tmp_path))
    assert inv.hosts["52:54:00:00:00:01"].append == "m=1"


def test_a_local_copy_that_does_not_fit_the_config_is_refused(tmp_path):
    localcopy.write(tmp_path / "state-snapshot.json", S.StateSnapshot(profiles={"default": {"image": "gone"}}))
    with pytest.raises(Exception) as e:
        StateService(cfg(tmp_path)).open()
    assert "profiles.default.image" in str(e.value)
