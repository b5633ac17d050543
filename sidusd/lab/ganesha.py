"""nfs-ganesha (and its rpcbind) inside a lab network namespace.

The kernel of the development machines has no nfsd, so the lab serves NFS
with nfs-ganesha.  NFSv3 needs rpcbind in the same network namespace *and*
with a private /run: ganesha registers through ``/run/rpcbind.sock``, and with
the host's /run it would register with the wrong rpcbind.  So both run in a
private mount namespace with a tmpfs on /run (see shared/design/BOOT-LAB.md)::

    ip netns exec NS unshare -m --propagation private sh -c '<LAUNCH>' ...

The main ganesha.conf written here ``%include``s ``exports_file``, the file
that :class:`sidusd.storage.nfs.GaneshaBackend` rewrites; sidusd's
``nfs.ganesha_pid_file`` must point at :attr:`GaneshaServer.pid_file`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from sidusd.errors import BackendError
from sidusd.storage.runner import Runner

# $1 conf, $2 log, $3 pid file, $4 rpcbind pid file.  Fixed text: the paths
# arrive as positional parameters, never spliced into the script.
LAUNCH = r"""
set -e
mount -t tmpfs -o mode=0755 sidus-run /run
rpcbind -f -w &
echo $! > "$4"
i=0
while [ ! -S /run/rpcbind.sock ]; do
  i=$((i+1)); [ $i -le 100 ] || { echo "rpcbind did not create /run/rpcbind.sock" >&2; exit 1; }
  sleep 0.1
done
exec ganesha.nfsd -F -f "$1" -L "$2" -p "$3"
"""

STOP_GRACE_S = 20      # ganesha takes a few seconds to shut down cleanly


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


class GaneshaServer:
    """One nfs-ganesha + rpcbind pair serving ``exports_file`` on ``listen_ip`` in ``netns``."""

    def __init__(self, netns: str, workdir: Path, exports_file: Path, listen_ip: str,
                 runner: Runner | None = None, propagation: str = "private"):
        self.netns = netns
        # "slave": mounts made on the host after the start (an overlay view of a new generation,
        # sidusd.image.views) propagate into ganesha's namespace, from a shared mount; its /run doesn't leak out
        self.propagation = propagation
        self.workdir = Path(workdir)
        self.exports_file = Path(exports_file)
        self.listen_ip = listen_ip
        self.runner = runner or Runner()
        self.config_file = self.workdir / "ganesha.conf"
        self.log_file = self.workdir / "ganesha.log"
        self.stdout_file = self.workdir / "ganesha.stdout"
        self.rpcbind_pid_file = self.workdir / "rpcbind.pid"
        self._proc: subprocess.Popen | None = None

    @property
    def pid_file(self) -> Path:
        """Where ganesha writes its pid: point sidusd's ``nfs.ganesha_pid_file`` here."""
        return self.workdir / "ganesha.pid"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def render_config(self) -> str:
        """The main ganesha.conf (ganesha-core-config(8)): NFSv3+4, no grace, our exports."""
        return (
            "# written by sidusd.lab.ganesha for the boot lab\n"
            "NFS_CORE_PARAM {\n"
            "    Protocols = 3, 4;\n"
            f"    Bind_addr = {self.listen_ip};\n"
            "}\n"
            "NFSV4 {\n"
            "    Graceless = true;            # a lab server starts and serves at once\n"
            f"    RecoveryRoot = \"{self.workdir / 'recovery'}\";\n"
            "}\n"
            f"%include \"{self.exports_file}\"\n")

    def start(self) -> None:
        """Write the config and start rpcbind + ganesha in the namespace (returns at once)."""
        if self._proc is not None and self._proc.poll() is None:
            raise BackendError("nfs-ganesha is already running", detail=f"pid {self._proc.pid}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "recovery").mkdir(exist_ok=True)
        if not self.exports_file.exists():
            self.exports_file.parent.mkdir(parents=True, exist_ok=True)
            self.exports_file.write_text("# no exports yet\n")
        self.config_file.write_text(self.render_config())
        for f in (self.pid_file, self.rpcbind_pid_file):
            f.unlink(missing_ok=True)
        argv = ["ip", "netns", "exec", self.netns, "unshare", "-m", "--propagation", self.propagation,
                "sh", "-c", LAUNCH, "sidus-ganesha", str(self.config_file), str(self.log_file),
                str(self.pid_file), str(self.rpcbind_pid_file)]
        with open(self.stdout_file, "ab") as out:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exports(self) -> list[str]:
        """Paths that ``showmount -e`` (run inside the namespace) lists now."""
        res = self.runner.run(["ip", "netns", "exec", self.netns, "showmount", "--no-headers",
                               "-e", self.listen_ip], timeout_s=10)
        if res.rc != 0:
            raise BackendError("showmount failed", detail=res.err.strip())
        return [ln.split()[0] for ln in res.out.splitlines() if ln.strip()]

    def _wait(self, path: str, present: bool, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        while True:
            if not self.running():
                rc = self._proc.returncode if self._proc else None
                raise BackendError(f"nfs-ganesha is not running (exit status {rc})",
                                   detail=self.log_tail())
            try:
                if (str(path) in self.exports()) == present:
                    return
                last = "showmount answered"
            except BackendError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                what = "exported" if present else "unexported"
                raise BackendError(f"{path} not {what} by nfs-ganesha within {timeout_s:g} s ({last})",
                                   detail=self.log_tail())
            time.sleep(0.3)

    def wait_ready(self, timeout_s: float = 30) -> int:
        """Wait until ganesha wrote its pid file and answers ``showmount``; its pid."""
        deadline = time.monotonic() + timeout_s
        last = "no pid file yet"
        while True:
            if not self.running():
                rc = self._proc.returncode if self._proc else None
                raise BackendError(f"nfs-ganesha exited during start-up (status {rc})",
                                   detail=self.log_tail())
            try:
                pid = int(self.pid_file.read_text().strip())
                self.exports()
                return pid
            except (OSError, ValueError):
                pass
            except BackendError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise BackendError(f"nfs-ganesha not ready within {timeout_s:g} s ({last})",
                                   detail=self.log_tail())
            time.sleep(0.3)

    def wait_exported(self, path: str | Path, timeout_s: float = 30) -> None:
        """Poll ``showmount -e`` in the namespace until ``path`` is listed; raise with the log tail."""
        self._wait(str(path), True, timeout_s)

    def wait_unexported(self, path: str | Path, timeout_s: float = 30) -> None:
        """Poll ``showmount -e`` until ``path`` is no longer listed."""
        self._wait(str(path), False, timeout_s)

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of ganesha's log (and of its stdout/stderr)."""
        chunks = []
        for f in (self.stdout_file, self.log_file):
            try:
                lines = f.read_text(errors="replace").splitlines()[-n:]
            except OSError:
                continue
            if lines:
                chunks.append(f"== {f.name}\n" + "\n".join(lines))
        return "\n".join(chunks)

    def stop(self) -> None:
        """SIGTERM ganesha and rpcbind (their process group), SIGKILL after a grace, wait."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        rpcbind = None
        try:
            rpcbind = int(self.rpcbind_pid_file.read_text().strip())
        except (OSError, ValueError):
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)     # the group we created: ganesha + rpcbind
            except ProcessLookupError:
                pass
            if rpcbind and not _gone(rpcbind):
                try:
                    os.kill(rpcbind, sig)
                except ProcessLookupError:
                    pass
            try:
                proc.wait(STOP_GRACE_S if sig == signal.SIGTERM else 5)
            except subprocess.TimeoutExpired:
                continue
            deadline = time.monotonic() + 5
            while rpcbind and not _gone(rpcbind) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not rpcbind or _gone(rpcbind):
                break

    def __enter__(self) -> GaneshaServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
