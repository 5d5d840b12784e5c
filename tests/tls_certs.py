"""Throw-away certificates for the TLS tests, made at test time with the ``openssl`` command line.

A test CA signs a server certificate for 127.0.0.1/localhost and client certificates; a second CA
signs an "untrusted" client certificate. Keys are unencrypted PEM (as dcmtk's ``-pw`` expects none).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path                # CA certificate (PEM) that signed server and client
    server: KeyPair         # CN=localhost, SAN IP:127.0.0.1, DNS:localhost
    client: KeyPair         # CN=SCANNER_TLS, signed by ca
    other_client: KeyPair   # CN=SCANNER_TLS, signed by another CA: not trusted
    other_ca: Path


def _run(*args: str) -> None:
    assert OPENSSL is not None, "openssl not installed"
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _leaf(folder: Path, name: str, cn: str, ca: tuple[Path, Path], *, server: bool) -> KeyPair:
    key, csr, cert, ext = (folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem",
                           folder / f"{name}.ext")
    _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
    if server:
        lines += ["extendedKeyUsage=serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    else:
        lines += ["extendedKeyUsage=clientAuth"]
    ext.write_text("\n".join(lines) + "\n")
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
         "-out", str(cert), "-days", "2", "-sha256", "-extfile", str(ext))
    return KeyPair(cert, key)


def make_pki(folder: Path) -> PKI:
    """A CA with server and client certificates, and an untrusted client certificate, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    other = _ca(folder, "other-ca")
    return PKI(
        ca=ca[0],
        server=_leaf(folder, "server", "localhost", ca, server=True),
        client=_leaf(folder, "client", "SCANNER_TLS", ca, server=False),
        other_client=_leaf(folder, "other-client", "SCANNER_TLS", other, server=False),
        other_ca=other[0],
    )
