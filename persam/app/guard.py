"""What protects the user's machine from other sites: Host names, Origins, request sizes.

* **Host names.**  Only the names the server was started for are served (:func:`served_hosts`:
  127.0.0.1, localhost and [::1] with the port on a loopback address, the ``--host`` given
  otherwise): a page of another site whose name was rebound to this address (DNS rebinding)
  gets 421 for every request.
* **Origins.**  A state-changing request (POST, PUT, PATCH, DELETE) that a browser sends from a
  page of another origin is refused (403), whatever its Host.
* **Sizes.**  A request body is cut off at the upload limit on the stream itself (a chunked
  upload has no Content-Length to trust); images are checked against the megapixel limit from
  their headers before they are decoded (:func:`persam.app.images.check_pixels`), and each
  session's files are bounded (:mod:`persam.app.session`).

:class:`Gate` is the plain ASGI middleware that does all three, and puts :data:`SECURITY_HEADERS`
on every response.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Optional, Tuple
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")

# Everything the page loads comes from this server: no fonts, scripts or styles from the web.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                               "style-src 'self'; connect-src 'self'; font-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def error_response(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------
# host names


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.x, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def _split_netloc(netloc: str) -> Tuple[str, Optional[int]]:
    """('host', port or None) of 'host[:port]' ('[v6]:port' too), lower-case; port -1 when malformed."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        end = netloc.find("]")
        host, rest = (netloc, "") if end < 0 else (netloc[:end + 1], netloc[end + 1:])
    else:
        host, colon, port = netloc.partition(":")
        rest = colon + port
    if not rest:
        return host, None
    if rest.startswith(":") and rest[1:].isdigit():
        return host, int(rest[1:])
    return host, -1


@dataclass(frozen=True)
class ServedHosts:
    """The Host names (with the port) the server answers to.

    `names` are lower-case host names or addresses ('[::1]' in brackets); with `any_address`
    (a server listening on every interface) any IP address is served as well: a DNS-rebinding
    page always arrives with a name of its own, never with an address."""

    names: Tuple[str, ...]
    port: int
    any_address: bool = False

    def __contains__(self, netloc: object) -> bool:
        if not isinstance(netloc, str):
            return False
        host, port = _split_netloc(netloc)
        if (80 if port is None else port) != self.port:
            return False
        return host in self.names or (self.any_address and _is_address(host))

    def __str__(self) -> str:
        shown = ", ".join(f"{name}:{self.port}" for name in self.names)
        return shown + (" and this machine's addresses" if self.any_address else "")


def served_hosts(host: str, port: int) -> ServedHosts:
    """The Host names of a server listening on host:port: the loopback names for a loopback address,
    the name or address given otherwise; for 0.0.0.0 / :: also this machine's names and addresses."""
    bound = host.strip().strip("[]").lower()
    shown = f"[{bound}]" if ":" in bound else bound
    if bound in ("", "0.0.0.0", "::"):
        names = LOOPBACK_NAMES + (socket.gethostname().lower(), socket.getfqdn().lower())
        return ServedHosts(tuple(dict.fromkeys(names)), port, any_address=True)
    if is_loopback(bound):
        return ServedHosts(tuple(dict.fromkeys(LOOPBACK_NAMES + (shown,))), port)
    return ServedHosts((shown,), port)


# --------------------------------------------------------------------------------------------
# the gate (plain ASGI: it sees the request body's stream, and every response)


class BodyTooLarge(StarletteHTTPException):
    """Raised from the request body's stream once it has passed the limit."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


class Gate:
    """Security headers on every response; 421 for a Host the server was not started for; 403 for
    a state-changing request from a foreign Origin; 413 for a body over the limit, counted on the
    stream (a chunked upload is cut off there, whatever it claims)."""

    def __init__(self, app, hosts: ServedHosts, limit_bytes: int, limit_mb: float) -> None:
        self.app, self.hosts, self.limit, self.limit_mb = app, hosts, limit_bytes, limit_mb

    def _too_large(self, size: str) -> str:
        return f"the upload is {size}, larger than the app's limit of {self.limit_mb:g} MB"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_with_headers(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if host not in self.hosts:
            response = error_response(421, f"this server answers to {self.hosts} only, not to the name {host!r} "
                                           f"(start it with --host NAME to serve another name)")
            return await response(scope, receive, send_with_headers)
        origin = headers.get("origin")
        if scope["method"] in STATE_CHANGING and origin is not None and not self._same_origin(origin):
            response = error_response(403, f"refused: a page of another site ({origin}) may not change this app's sessions")
            return await response(scope, receive, send_with_headers)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            response = error_response(413, self._too_large(f"{int(length) / 2**20:.0f} MB"))
            return await response(scope, receive, send_with_headers)

        received = 0

        async def receive_counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self._too_large(f"over {self.limit / 2**20:.0f} MB"))
            return message

        try:
            await self.app(scope, receive_counted, send_with_headers)
        except BodyTooLarge as exc:  # raised where nothing turned it into a response
            if started:
                raise
            await error_response(413, exc.detail)(scope, receive, send_with_headers)

    def _same_origin(self, origin: str) -> bool:
        parts = urlsplit(origin.strip())
        return parts.scheme == "http" and parts.netloc in self.hosts
