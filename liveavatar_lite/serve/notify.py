"""systemd's notify protocol, written directly (no dependency): one datagram to $NOTIFY_SOCKET.

    notifier = SystemdNotifier.from_env()     # a no-op without NOTIFY_SOCKET
    notifier.send("READY=1")                  # once listening (Type=notify)
    notifier.ping()                           # WATCHDOG=1, at most every WATCHDOG_USEC / 2

With `WatchdogSec=` in the unit, systemd kills and restarts the server when the pings stop: the
dispatcher thread pings each loop, so a wedged dispatcher (not just a dead process) is caught.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, address: str | None, watchdog_s: float | None) -> None:
        self.address = address
        self.interval = watchdog_s / 2 if watchdog_s else None  # ping twice per watchdog period
        self._last_ping = 0.0
        self._sock: socket.socket | None = None
        self._warned = False  # one warning, not one per ping

    @classmethod
    def from_env(cls) -> SystemdNotifier:
        address = os.environ.get("NOTIFY_SOCKET") or None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        watchdog = int(usec) / 1e6 if usec.isdigit() and (not pid or pid == str(os.getpid())) else None
        return cls(address, watchdog)

    def send(self, message: str) -> None:
        """Send one state line ("READY=1", "STOPPING=1", "STATUS=..."); a failure is logged, never raised."""
        if not self.address:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address  # abstract namespace
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)  # never wait on a reader: the caller is the dispatcher's loop
            self._sock.sendto(message.encode(), target)
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address, e)

    def ping(self) -> None:
        """WATCHDOG=1 if the watchdog is on and half its period has passed since the last ping."""
        if self.interval is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.interval:
            self._last_ping = now
            self.send("WATCHDOG=1")
