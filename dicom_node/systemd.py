"""systemd's notify protocol (sd_notify(3)) in a few lines of ``socket``: ``READY=1`` once the node serves,
``WATCHDOG=1`` while it is healthy, ``STOPPING=1`` when it stops.

systemd passes the socket in ``$NOTIFY_SOCKET`` (a unix datagram socket: a path, or ``@name`` for the abstract
namespace) and, with ``WatchdogSec=``, the watchdog interval in ``$WATCHDOG_USEC`` (for the process
``$WATCHDOG_PID`` when set). Without them (not run by systemd, or ``Type=simple``) nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, newline-separated assignments) to systemd; False when there is no
    notify socket, or it cannot be reached (logged, never raised: systemd's bookkeeping must not stop the node)."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", state.split("\n")[0], exc)
        return False
    return True


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to send ``WATCHDOG=1``: half of ``WatchdogSec=`` (as sd_watchdog_enabled(3) advises); None when
    systemd expects no watchdog pings from this process."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
        pid = int(env.get("WATCHDOG_PID", "0") or 0)
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 2e6
