"""The HTTP connection guard: slow clients cannot hold the server's connections (slowloris).

uvicorn's h11 protocol waits as long as a client likes for a request's headers (its keep-alive
timeout runs only between two requests), and its concurrency limit counts open connections: a few
hundred connections that never finish their headers make every request, /healthz included, get
503 - without a token. `guarded_protocol` is uvicorn's h11 protocol with three limits more:

- a request's headers must arrive within `header_timeout_s` of the connection (or of the previous
  response on a kept-alive one); else the connection is closed;
- its body must arrive within `body_timeout_s` of its headers (uploads have their own, shorter
  limit in the API: `--request-timeout`);
- a request that upgrades to a WebSocket (a talk session) leaves both deadlines behind;
- one client address holds at most `per_client` connections still waiting for headers: a new
  connection past that closes that client's oldest waiting one, so the dawdler pays, not the
  newcomer (a kiosk's page or a health check from the same address still gets through); an idle
  kept-alive connection is not counted (it closes after 5 idle seconds, and closing a client's pooled
  connection for a newcomer would reset that client's next request);
- all addresses together hold at most `max_waiting` such connections (a LAN has many addresses:
  16 each from 40 of them would fill any connection limit): past it the oldest waiting one of
  any address is closed, so connections that send their headers at once always find room.

    server = uvicorn.Server(uvicorn.Config(app, http=guarded_protocol(10.0, 120.0, 16, 192), ...))
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict, defaultdict
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def guarded_protocol(header_timeout_s: float, body_timeout_s: float, per_client: int,
                     max_waiting: int | None = None) -> type[H11Protocol]:
    """A subclass of uvicorn's h11 protocol with the limits above (its own registry of waiting connections)."""
    waiting: dict[str, OrderedDict[int, GuardedH11Protocol]] = defaultdict(OrderedDict)
    waiting_all: OrderedDict[int, GuardedH11Protocol] = OrderedDict()  # every address's, oldest first

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._guard_timer: asyncio.TimerHandle | None = None
            self._address = self.client[0] if self.client else "?"
            self._awaiting_headers = True
            self._expect_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE and self._awaiting_headers:
                # the headers are in: the body (if any) gets its own deadline
                self._awaiting_headers = False
                self._forget()
                self._arm(body_timeout_s, h11.SEND_BODY)

        def handle_websocket_upgrade(self, event: h11.Request) -> None:
            # the connection becomes a WebSocket (a talk session, sessions.py) and outlives any body
            # deadline: h11 still says SEND_BODY for it, so the timer armed at its headers must go, and
            # none may be armed after it (this runs inside data_received, before its headers check)
            self._awaiting_headers = False
            self._forget()
            super().handle_websocket_upgrade(event)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                # a kept-alive connection waits for the next request's headers, under the same deadline;
                # it is not one the quotas close for newcomers (a client's pooled connection would be
                # reset under its next request), and uvicorn closes it after 5 idle seconds anyway
                self._awaiting_headers = True
                self._arm(header_timeout_s, h11.IDLE)
            # (a client still sending a body nobody reads stays under the body deadline set at its headers)

        def send_400_response(self, msg: str) -> None:
            """A request h11 cannot parse (a header line over its limit, bytes no header may hold): the API's
            one-line JSON error, not uvicorn's plain text, then the connection closes."""
            body = b'{"error":"malformed HTTP request (a header too large, or bytes a header may not hold)"}'
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            try:
                self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
                self.transport.write(self.conn.send(h11.Data(data=body)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:  # h11 cannot answer in its state: closing is the answer
                pass
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._forget()
            super().connection_lost(exc)

        # ---- the guard ------------------------------------------------------------------------

        def _expect_headers(self) -> None:
            clients = waiting[self._address]
            while len(clients) >= per_client:  # the oldest dawdler of this address makes room
                _, oldest = clients.popitem(last=False)
                oldest._close()
            while max_waiting is not None and len(waiting_all) >= max_waiting:  # ... and of all addresses
                _, oldest = waiting_all.popitem(last=False)
                oldest._close()
            waiting[self._address][id(self)] = self  # (looked up again: a close above may have dropped it)
            waiting_all[id(self)] = self
            self._arm(header_timeout_s, h11.IDLE)

        def _arm(self, seconds: float, state: Any) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
            self._guard_timer = self.loop.call_later(seconds, self._expire, state)

        def _expire(self, state: Any) -> None:
            """Close the connection if the client is still where it was `seconds` ago (headers or body)."""
            self._guard_timer = None
            if self.conn.their_state is state:
                self._close()

        def _forget(self) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None
            waiting_all.pop(id(self), None)
            clients = waiting.get(self._address)
            if clients is not None:
                clients.pop(id(self), None)
                if not clients:
                    waiting.pop(self._address, None)

        def _close(self) -> None:
            self._forget()
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
