"""A site's small PKI for the remote control plane, made with the ``openssl`` command line.

    sidusctl pki ca DIR [--name SITE]                       DIR/ca.crt, DIR/ca.key
    sidusctl pki server DIR NAME --address IP|DNS ...       DIR/NAME.crt, DIR/NAME.key (serverAuth, SANs)
    sidusctl pki client DIR NAME                            DIR/NAME.crt, DIR/NAME.key (clientAuth, CN=NAME)

Keys are ECDSA P-256, written 0600 (umask 077 for the whole run); certificates 0644.  A
client's role is not in its certificate: the server's ``control.tcp.admins`` / ``readers``
name its CN (docs/operations.md "Remote control").  Nothing is overwritten.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

CA_DAYS = 3650
LEAF_DAYS = 825
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


class PkiError(Exception):
    """A certificate could not be made; the message says why."""


def _openssl(args: Sequence[str]) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise PkiError("the openssl command is missing (apt-get install openssl)")
    old = os.umask(0o077)
    try:
        r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)
    finally:
        os.umask(old)
    if r.returncode != 0:
        raise PkiError(f"openssl {args[0]} failed: {r.stderr.strip()[-400:]}")


def _fresh(*paths: Path) -> None:
    for p in paths:
        if p.exists():
            raise PkiError(f"{p} exists: not overwritten (remove it first to make a new one)")


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise PkiError(f"{name!r}: a name is letters, digits, '_', '.', '-' (1-63), starting with a letter or digit")


def init_ca(directory: Path, name: str = "sidus") -> Path:
    """A new CA in ``directory``; returns the certificate's path."""
    _check_name(name)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    crt, key = directory / "ca.crt", directory / "ca.key"
    _fresh(crt, key)
    _openssl(["req", "-x509", *_KEY, "-keyout", str(key), "-out", str(crt), "-days", str(CA_DAYS),
              "-subj", f"/CN={name} control CA", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    crt.chmod(0o644)
    return crt


def _san(addresses: Sequence[str]) -> str:
    out = []
    for a in addresses:
        try:
            out.append(f"IP:{ipaddress.ip_address(a)}")
        except ValueError:
            if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})\Z", a):
                raise PkiError(f"{a!r} is neither an IP address nor a DNS name") from None
            out.append(f"DNS:{a}")
    return ",".join(out)


def issue(directory: Path, name: str, kind: str, addresses: Sequence[str] = ()) -> Path:
    """A certificate signed by ``directory``'s CA: ``kind`` "server" (``addresses``: what clients
    dial, at least one) or "client" (CN = ``name``).  Returns the certificate's path."""
    _check_name(name)
    ca_crt, ca_key = directory / "ca.crt", directory / "ca.key"
    if not ca_crt.exists() or not ca_key.exists():
        raise PkiError(f"no CA in {directory}: run `sidusctl pki ca {directory}` first")
    if kind == "server" and not addresses:
        raise PkiError("a server certificate needs --address (the IP or name sidusctl --server dials)")
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    _fresh(crt, key)
    ext = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
           f"extendedKeyUsage={'serverAuth' if kind == 'server' else 'clientAuth'}"]
    if kind == "server":
        ext.append(f"subjectAltName={_san(addresses)}")
    with tempfile.TemporaryDirectory() as tmp:
        csr, extfile = Path(tmp) / "req.csr", Path(tmp) / "ext.cnf"
        extfile.write_text("\n".join(ext) + "\n")
        _openssl(["req", *_KEY, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}"])
        _openssl(["x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
                  "-set_serial", str(secrets.randbits(63)), "-days", str(LEAF_DAYS), "-sha256",
                  "-extfile", str(extfile), "-out", str(crt)])
    crt.chmod(0o644)
    return crt
