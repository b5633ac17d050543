"""Re-capture golden packets from the real TFTP clients, on 127.0.0.1 only.

    python3 tests/golden/tftp/capture_clients.py      # writes *.hex next to this file

A tiny UDP listener takes each client's first datagram (its RRQ), and for the
``*-ack-*`` files answers with one reply and records the client's next packet.
Clients write to a scratch file, never to /dev/null: atftp unlinks its local
file when a transfer fails.
"""

import io
import logging
import pathlib
import socket
import subprocess
import tempfile
import threading

OUT = pathlib.Path(__file__).resolve().parent
SCRATCH = tempfile.mkdtemp(prefix="sidus-cap-") + "/out"


def listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(10)
    return s, s.getsockname()[1]


def cap(name, argv_fn=None, pyfn=None, reply=None):
    s, port = listener()
    p = None
    if pyfn:
        threading.Thread(target=pyfn, args=(port,), daemon=True).start()
    else:
        p = subprocess.Popen(argv_fn(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    data, addr = s.recvfrom(65536)
    if reply is not None:
        t, _ = listener()
        t.sendto(reply, addr)
        data, _ = t.recvfrom(65536)
        t.sendto(b"\x00\x05\x00\x00capture done\x00", addr)
        t.close()
    else:
        s.sendto(b"\x00\x05\x00\x01capture only\x00", addr)
    if p:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    s.close()
    (OUT / f"{name}.hex").write_text(data.hex() + "\n")
    print(name, data)


def tftpy_get(port):
    import tftpy
    logging.getLogger("tftpy").setLevel(logging.CRITICAL)
    try:
        tftpy.TftpClient("127.0.0.1", port, options={"blksize": 1432, "tsize": 0}).download(
            "pxelinux.cfg/01-52-54-00-12-34-56", io.BytesIO(), timeout=2)
    except Exception:
        pass


if __name__ == "__main__":
    cap("curl-rrq-blksize1468", lambda p: ["curl", "-s", "--tftp-blksize", "1468", "-o", SCRATCH,
                                           f"tftp://127.0.0.1:{p}/pxelinux.0"])
    cap("curl-rrq-default", lambda p: ["curl", "-s", "-o", SCRATCH, f"tftp://127.0.0.1:{p}/boot/vmlinuz"])
    cap("atftp-rrq-windowsize", lambda p: ["atftp", "--option", "windowsize 16", "--option", "blksize 1468",
                                           "--option", "tsize 0", "-g", "-r", "images/demo/initrd.img",
                                           "-l", SCRATCH, "127.0.0.1", str(p)])
    cap("atftp-rrq-plain", lambda p: ["atftp", "-g", "-r", "pxelinux.0", "-l", SCRATCH, "127.0.0.1", str(p)])
    cap("busybox-rrq-blksize", lambda p: ["busybox", "tftp", "-g", "-r", "ldlinux.c32", "-l", SCRATCH,
                                          "-b", "1468", "127.0.0.1", str(p)])
    cap("tftpy-rrq-options", pyfn=tftpy_get)
    cap("atftp-ack-oack", lambda p: ["atftp", "--option", "blksize 1468", "-g", "-r", "f", "-l", SCRATCH,
                                     "127.0.0.1", str(p)], reply=b"\x00\x06blksize\x001468\x00")
    cap("busybox-ack-1", lambda p: ["busybox", "tftp", "-g", "-r", "f", "-l", SCRATCH, "127.0.0.1", str(p)],
        reply=b"\x00\x03\x00\x01" + b"x" * 512)
