"""DICOM TLS (PS3.15 Annex B, the BCP 195 profiles): SSL contexts for the listener and the SCU, the TLS listener
itself, and what a verified client certificate says.

Python's ``ssl`` does the work. The node never accepts or offers TLS older than 1.2 (``[tls] min_version``).
The listener wraps each accepted connection without handshaking (:class:`NodeAssociationServer`); the
handshake runs in the connection's own thread with ``[tls] handshake_timeout_s``
(:func:`handshake`), so a client that connects and says nothing cannot stall the listener.
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from .config import Destination, TLSSettings

log = logging.getLogger(__name__)

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def certificate_not_after(path: Path) -> float | None:
    """When the (first) certificate in the PEM file ``path`` expires (seconds since the epoch); None when it cannot
    be read here (not PEM, or this Python lacks the decoder)."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)  # CPython's own X.509 reader
    if decode is None:
        return None
    try:
        return float(ssl.cert_time_to_seconds(decode(str(path))["notAfter"]))
    except (ssl.SSLError, OSError, ValueError, KeyError, TypeError):
        return None


def server_context(settings: TLSSettings) -> ssl.SSLContext:
    """The TLS listener's context: the node's certificate, TLS ``min_version`` or newer, and client
    certificates required (``require_client_cert``), verified when presented (``ca_file`` set) or not asked for."""
    if settings.cert_file is None or settings.key_file is None:
        raise ValueError("[tls] cert_file and key_file are needed for a TLS listener")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _VERSIONS[settings.min_version]
    context.load_cert_chain(settings.cert_file, settings.key_file)
    if settings.ca_file is not None:
        context.load_verify_locations(cafile=settings.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if settings.require_client_cert else ssl.CERT_OPTIONAL
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


class _RecordingSSLSocket(ssl.SSLSocket):
    """An SCU's TLS socket that keeps why its connection failed on its context (pynetdicom only logs it)."""

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            self.context.dn_failure = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
            raise


def connect_failure(context: ssl.SSLContext | None) -> str | None:
    """Why the TLS connection made with ``context`` (from :func:`client_context`) failed, if it did."""
    return getattr(context, "dn_failure", None)


def client_context(dest: Destination, settings: TLSSettings) -> ssl.SSLContext:
    """The SCU's context towards ``dest``: its certificate verified (``tls_ca_file`` or the system's CAs)
    and its name checked, TLS ``min_version`` or newer, the node's certificate when ``tls_client_cert``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=dest.tls_ca_file)
    context.sslsocket_class = _RecordingSSLSocket
    context.minimum_version = _VERSIONS[settings.min_version]
    if dest.tls_client_cert:
        if settings.cert_file is None or settings.key_file is None:
            raise ValueError(f"destination {dest.name}: tls_client_cert, but [tls] has no cert_file/key_file")
        context.load_cert_chain(settings.cert_file, settings.key_file)
    return context


def tls_args(dest: Destination, settings: TLSSettings) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``AE.associate``: (context, server name), or None for a plain destination."""
    if not dest.tls:
        return None
    return client_context(dest, settings), dest.tls_server_name or dest.host


def handshake(sock: Any, timeout_s: float) -> str | None:
    """Complete the server side of the TLS handshake on an accepted connection; None when done (or not a TLS
    socket), else why it failed (the connection is then closed)."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        sock.settimeout(timeout_s)
        sock.do_handshake()
        sock.settimeout(None)
        return None
    except (ssl.SSLError, OSError) as exc:
        why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        return str(why)


def describe_connection(sock: Any) -> str | None:
    """"TLSv1.3, client certificate CN=..." for a TLS connection; None for a plain one."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    name = common_name(sock)
    return f"{sock.version()}, " + (f"client certificate CN={name}" if name else "no client certificate")


def common_name(sock: Any) -> str | None:
    """The subject commonName of the client certificate the TLS listener verified on ``sock``, if any."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()
    except (ValueError, OSError):
        return None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, wrapping accepted connections in TLS without handshaking in the
    listener's thread (pynetdicom handshakes there, where one silent client would stall every other).
    :class:`SharedPortAssociationServer` also lets other receiver processes bind the same port."""

    #: ``SO_REUSEPORT`` before the bind (pynetdicom's ``server_bind`` ignores ``allow_reuse_port``)
    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address


class SharedPortAssociationServer(NodeAssociationServer):
    """The listener of one of several receiver processes sharing a port (``[node] reuse_port``)."""

    reuse_port = True
