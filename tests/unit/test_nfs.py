"""storage/nfs.py: export planning (pure), rendering, backends through RecordingRunner."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import poll_until

from sidusd.errors import BackendError, ConfigError
from sidusd.storage import nfs
from sidusd.storage.runner import RecordingRunner

NET = ipaddress.IPv4Network("10.13.20.0/24")
NET2 = ipaddress.IPv4Network("192.168.7.0/24")


def cfg(images: dict[str, str], tmp: Path, backend="kernel", nets=(NET,)):
    """A stand-in with the attributes of config.Config that nfs.py reads."""
    return SimpleNamespace(
        images={k: SimpleNamespace(root=Path(v), kernel="k", initrd="i", append="") for k, v in images.items()},
        nfs=SimpleNamespace(backend=backend, client_networks=tuple(nets),
                            exports_file=tmp / "sidus.exports", ganesha_config=tmp / "sidus.conf",
                            ganesha_pid_file=tmp / "ganesha.pid"))


def dirs(tmp: Path, *names: str) -> dict[str, str]:
    """Image name -> an existing root directory (the manager exports only roots that exist)."""
    out = {}
    for n in names:
        (tmp / "srv" / n).mkdir(parents=True, exist_ok=True)
        out[n] = str(tmp / "srv" / n)
    return out


def test_plan_one_export_per_root_sorted_and_deduplicated(tmp_path):
    c = cfg({"b": "/srv/b", "a": "/srv/a", "a2": "/srv/a/"}, tmp_path, nets=(NET, NET2))
    plan = nfs.plan_exports(c)
    assert [str(e.path) for e in plan] == ["/srv/a", "/srv/b"]
    assert plan[0].images == ("a", "a2") and plan[1].images == ("b",)
    assert all(e.pseudo == str(e.path) and e.clients == (NET, NET2) for e in plan)
    assert len({e.export_id for e in plan}) == 2


def test_export_ids_follow_the_path_not_the_position(tmp_path):
    both = {e.path: e.export_id for e in nfs.plan_exports(cfg({"a": "/srv/a", "b": "/srv/b"}, tmp_path))}
    only_b = {e.path: e.export_id for e in nfs.plan_exports(cfg({"b": "/srv/b"}, tmp_path))}
    assert only_b[Path("/srv/b")] == both[Path("/srv/b")]
    assert all(1 <= i <= 65535 for i in both.values())


def test_export_id_collision_probes_to_next_free():
    first = nfs.export_id_for("/srv/x", set())
    assert nfs.export_id_for("/srv/x", {first}) == (first % 65535) + 1
    assert nfs.export_id_for("/srv/x", {65535} if first == 65535 else set()) in range(1, 65536)


def test_plan_empty_and_refusals(tmp_path):
    assert nfs.plan_exports(cfg({}, tmp_path, nets=())) == []
    with pytest.raises(ConfigError) as ei:
        nfs.plan_exports(cfg({"a": "/srv/a"}, tmp_path, nets=()))
    assert ei.value.path == "nfs.client_networks"
    for bad in ["relative/x", "/srv/a b", '/srv/"q', "/srv/a\n/etc", "/srv/(x)", "/srv/../etc"]:
        with pytest.raises(ConfigError) as ei:
            nfs.plan_exports(cfg({"img": bad}, tmp_path))
        assert ei.value.path == "images.img.root"


def test_render_kernel_exports(tmp_path):
    plan = nfs.plan_exports(cfg({"a": "/srv/a"}, tmp_path, nets=(NET, NET2)))
    text = nfs.render_kernel_exports(plan)
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert lines == ["/srv/a 10.13.20.0/24(ro,no_subtree_check,no_root_squash,async) "
                     "192.168.7.0/24(ro,no_subtree_check,no_root_squash,async)"]


def test_render_ganesha_exports_blocks(tmp_path):
    plan = nfs.plan_exports(cfg({"a": "/srv/a", "b": "/srv/b"}, tmp_path))
    text = nfs.render_ganesha_exports(plan)
    assert text.count("EXPORT {") == 2
    for e in plan:
        assert f"Export_Id = {e.export_id};" in text
        assert f'Path = "{e.path}";' in text and f'Pseudo = "{e.path}";' in text
    assert text.count("CLIENT { Clients = 10.13.20.0/24; Access_Type = RO; }") == 2
    assert text.count("Access_Type = None;") == 2     # nobody outside the CLIENT blocks
    assert text.count("Squash = No_Root_Squash;") == 2
    assert text.count("FSAL { Name = VFS; }") == 2
    assert text.count("{") == text.count("}")


def run(coro):
    return asyncio.run(coro)


def test_kernel_backend_writes_then_exportfs(tmp_path):
    c = cfg(dirs(tmp_path, "a", "b"), tmp_path)
    rr = RecordingRunner()
    m = nfs.NfsManager(c, rr)
    run(m.apply(c))
    assert rr.calls == [["exportfs", "-ra"]]
    written = (tmp_path / "sidus.exports").read_text()
    assert f"{tmp_path}/srv/a 10.13.20.0/24(" in written and f"{tmp_path}/srv/b 10.13.20.0/24(" in written
    assert oct((tmp_path / "sidus.exports").stat().st_mode & 0o777) == "0o644"
    h = m.health()
    assert h["backend"] == "kernel" and h["ok"] and h["exports"] == [f"{tmp_path}/srv/a", f"{tmp_path}/srv/b"]
    # image b leaves the config: it leaves the exports file
    c2 = cfg(dirs(tmp_path, "a"), tmp_path)
    run(m.apply(c2))
    assert f"{tmp_path}/srv/b" not in (tmp_path / "sidus.exports").read_text()
    assert m.health()["exports"] == [f"{tmp_path}/srv/a"]
    run(m.remove_all())
    assert not (tmp_path / "sidus.exports").exists()
    assert rr.calls == [["exportfs", "-ra"]] * 3


def test_kernel_backend_error_carries_exportfs_stderr(tmp_path):
    c = cfg(dirs(tmp_path, "a"), tmp_path)
    rr = RecordingRunner()
    rr.script(["exportfs"], rc=1, stderr=b"exportfs: Failed to stat /srv/a: No such file or directory\n")
    m = nfs.NfsManager(c, rr)
    with pytest.raises(BackendError) as ei:
        run(m.apply(c))
    assert ei.value.detail == "exportfs: Failed to stat /srv/a: No such file or directory"
    h = m.health()
    assert not h["ok"] and "Failed to stat /srv/a" in h["detail"]


def test_kernel_backend_unwritable_dir(tmp_path):
    c = cfg(dirs(tmp_path, "a"), tmp_path)
    c.nfs.exports_file = tmp_path / "missing-dir" / "sidus.exports"
    with pytest.raises(BackendError, match="cannot write"):
        run(nfs.NfsManager(c, RecordingRunner()).apply(c))


def test_manager_plan_error_becomes_backend_error(tmp_path):
    c = cfg({"a": "/srv/a"}, tmp_path, nets=())
    with pytest.raises(BackendError, match="nfs.client_networks"):
        run(nfs.NfsManager(c, RecordingRunner()).apply(c))


def test_backend_none_does_nothing_and_says_so(tmp_path):
    c = cfg({"a": "/srv/a"}, tmp_path, backend="none")
    rr = RecordingRunner()
    m = nfs.NfsManager(c, rr)
    run(m.apply(c))
    run(m.remove_all())
    assert rr.calls == [] and list(tmp_path.iterdir()) == []
    assert m.health() == {"backend": "none", "ok": True,
                          "detail": "nfs.backend is none: sidusd manages no exports", "exports": []}


def test_unknown_backend_refused(tmp_path):
    with pytest.raises(ConfigError):
        nfs.NfsManager(cfg({}, tmp_path, backend="samba"), RecordingRunner())




@pytest.fixture
def fake_ganesha(tmp_path):
    """A real process named ganesha.nfsd that counts the SIGHUPs it gets."""
    exe = tmp_path / "ganesha.nfsd"
    exe.write_text("#!/bin/sh\nn=0\ntrap 'n=$((n+1)); echo $n > \"$1\"' HUP\n"
                   ": > \"$1.ready\"\n"
                   "while :; do sleep 0.05; done\n")
    exe.chmod(0o755)
    hups = tmp_path / "hups"
    p = subprocess.Popen([str(exe), str(hups)])
    ready = tmp_path / "hups.ready"      # its trap is set: a SIGHUP before that would kill it
    if not poll_until(ready.exists):
        raise AssertionError("the fake ganesha.nfsd never set its SIGHUP trap")
    (tmp_path / "ganesha.pid").write_text(f"{p.pid}\n")
    yield p, hups
    p.kill()
    p.wait()


def _hups(hups: Path) -> str | None:
    """The fake ganesha's SIGHUP count so far (None before the first)."""
    return hups.read_text().strip() if hups.exists() else None


def _wait_hups(hups: Path, n: int) -> None:
    if not poll_until(lambda: _hups(hups) == str(n)):
        raise AssertionError(f"expected {n} SIGHUPs, file says {_hups(hups)}")


def test_ganesha_backend_writes_and_signals(tmp_path, fake_ganesha):
    proc, hups = fake_ganesha
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    c = cfg({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, tmp_path, backend="ganesha")
    m = nfs.NfsManager(c, RecordingRunner())
    run(m.apply(c))
    _wait_hups(hups, 1)
    assert (tmp_path / "sidus.conf").read_text().count("EXPORT {") == 2
    h = m.health()
    assert h["ok"] and h["backend"] == "ganesha" and len(h["exports"]) == 2
    run(m.apply(cfg({"a": str(tmp_path / "a")}, tmp_path, backend="ganesha")))
    _wait_hups(hups, 2)
    assert str(tmp_path / "b") not in (tmp_path / "sidus.conf").read_text()
    run(m.remove_all())
    _wait_hups(hups, 3)
    assert "EXPORT" not in (tmp_path / "sidus.conf").read_text()


def test_ganesha_backend_reports_not_running(tmp_path):
    (tmp_path / "a").mkdir()
    c = cfg({"a": str(tmp_path / "a")}, tmp_path, backend="ganesha")
    m = nfs.NfsManager(c, RecordingRunner())
    with pytest.raises(BackendError) as ei:
        run(m.apply(c))
    assert "no pid file" in ei.value.detail
    assert (tmp_path / "sidus.conf").read_text().count("EXPORT {") == 1   # ready for its start
    h = m.health()
    assert not h["ok"] and "no pid file" in h["detail"]
    # a pid that is not ganesha (our own) is a stale pid file, not a process to signal
    (tmp_path / "ganesha.pid").write_text(str(os.getpid()))
    with pytest.raises(BackendError, match="stale pid file"):
        run(m.apply(c))
    (tmp_path / "ganesha.pid").write_text("garbage")
    assert "not a pid" in m.health()["detail"]


def test_ganesha_backend_refuses_missing_root(tmp_path, fake_ganesha):
    c = cfg({"a": str(tmp_path / "nope")}, tmp_path, backend="ganesha")
    with pytest.raises(BackendError) as ei:
        run(nfs.NfsManager(c, RecordingRunner()).apply(c))
    assert str(tmp_path / "nope") in ei.value.detail


def test_ganesha_log_confirmation(tmp_path, fake_ganesha):
    _proc, hups = fake_ganesha
    (tmp_path / "a").mkdir()
    log = tmp_path / "ganesha.log"
    log.write_text("old : CONFIG :CRIT :an error from before\n")
    exports = nfs.plan_exports(cfg({"a": str(tmp_path / "a")}, tmp_path))
    b = nfs.GaneshaBackend(RecordingRunner(), tmp_path / "sidus.conf", tmp_path / "ganesha.pid",
                           log_file=log, reload_timeout_s=0.5)

    async def reload_then_log(lines: str):
        before = _hups(hups)
        task = asyncio.create_task(b.apply(exports))
        # ganesha got its SIGHUP (the backend took the log's length before sending it): log the reload
        while _hups(hups) == before:
            assert not task.done(), task
            await asyncio.sleep(0.005)
        with open(log, "a") as f:
            f.write(lines)
        await task
    run(reload_then_log("x[sigmgr] reread_exports :CONFIG :EVENT :Reread exports complete\n"))
    with pytest.raises(BackendError) as ei:
        run(reload_then_log("x[sigmgr] config_errs_to_log :CONFIG :CRIT :1 validation errors in block EXPORT\n"
                            "x[sigmgr] reread_exports :CONFIG :EVENT :Reread exports complete\n"))
    assert "validation errors" in ei.value.detail and "from before" not in ei.value.detail
    with pytest.raises(BackendError, match="did not confirm"):
        run(b.apply(exports))
    assert not b.health()["ok"]


def test_backend_change_removes_old_exports(tmp_path):
    c = cfg(dirs(tmp_path, "a"), tmp_path)
    rr = RecordingRunner()
    m = nfs.NfsManager(c, rr)
    run(m.apply(c))
    run(m.apply(cfg(dirs(tmp_path, "a"), tmp_path, backend="none")))
    assert not (tmp_path / "sidus.exports").exists()
    assert m.health()["backend"] == "none"


def test_plan_from_the_real_config_parser(tmp_path):
    from sidusd import config as config_mod
    c = config_mod.parse(
        "dhcp: {mode: 'off'}\n"
        f"tftp: {{root: {tmp_path}}}\n"
        "nfs: {backend: kernel, client_networks: [10.13.20.0/24]}\n"
        "images:\n"
        "  demo: {root: /srv/sidus/demo, kernel: demo/vmlinuz, initrd: demo/initrd.img}\n",
        "t.yaml", tmp_path)
    (e,) = nfs.plan_exports(c)
    assert (str(e.path), e.clients, e.images) == ("/srv/sidus/demo", (NET,), ("demo",))


def test_a_missing_root_does_not_block_the_other_exports(tmp_path):
    """One image whose root is missing is left out, said in the error and in health(); the others
    are exported (before: the backend refused the whole apply and exported nothing new)."""
    good = dirs(tmp_path, "a", "c")
    c = cfg({**good, "b": str(tmp_path / "never-built")}, tmp_path)
    rr = RecordingRunner()
    m = nfs.NfsManager(c, rr)
    with pytest.raises(BackendError) as ei:
        run(m.apply(c))
    assert str(tmp_path / "never-built") in ei.value.detail and "images b" in ei.value.detail
    written = (tmp_path / "sidus.exports").read_text()
    assert f"{good['a']} 10.13.20.0/24(" in written and f"{good['c']} 10.13.20.0/24(" in written
    assert "never-built" not in written
    assert rr.calls == [["exportfs", "-ra"]]
    h = m.health()
    assert not h["ok"] and h["exports"] == [good["a"], good["c"]]
    assert h["skipped"] == [str(tmp_path / "never-built")] and "never-built (b)" in h["detail"]
    # built later: the next apply exports it and the health is good again
    (tmp_path / "never-built").mkdir()
    run(m.apply(c))
    assert m.health()["ok"] and "never-built" in (tmp_path / "sidus.exports").read_text()


def test_ganesha_a_missing_root_does_not_block_the_others(tmp_path, fake_ganesha):
    _proc, hups = fake_ganesha
    good = dirs(tmp_path, "a")
    c = cfg({**good, "b": str(tmp_path / "nope")}, tmp_path, backend="ganesha")
    m = nfs.NfsManager(c, RecordingRunner())
    with pytest.raises(BackendError):
        run(m.apply(c))
    _wait_hups(hups, 1)                       # ganesha was told: the good export is served
    text = (tmp_path / "sidus.conf").read_text()
    assert text.count("EXPORT {") == 1 and f'Path = "{good["a"]}";' in text
