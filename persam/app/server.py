"""The HTTP side of ``persam app``: FastAPI routes over :mod:`persam.app.state`, and :func:`serve`.

Routes only translate HTTP: they find the browser's session (cookie ``persam_session``), run one
:class:`~persam.app.state.Session` method under its lock in a worker thread and turn its answer
into JSON, an image or a file.  Errors come back as ``{"error": "one line"}``: 400 bad input,
403 a foreign Origin, 404 unknown id, 410 the session has ended, 413 too large, 421 a Host name
the server was not started for, 422 a request body of the wrong shape (the field named), 503 no
room for a new session, 500 a bug (logged; the server keeps serving).

What protects the user's machine:

* **Host names.**  Only the names the server was started for are served (:func:`served_hosts`:
  127.0.0.1, localhost and [::1] with the port on a loopback address, the ``--host`` given
  otherwise): a page of another site whose name was rebound to this address (DNS rebinding)
  gets 421 for every request.
* **Origins.**  A state-changing request (POST, PUT, PATCH, DELETE) that a browser sends from a
  page of another origin is refused (403), whatever its Host.
* **Sizes.**  A request body is cut off at the upload limit on the stream itself (a chunked
  upload has no Content-Length to trust); images are checked against the megapixel limit from
  their headers before they are decoded, and each session's files are bounded (state.py).
* **Sessions.**  A session is made by a person's first state-changing request, never by a GET;
  a new one never replaces a working session; the page is told when its session has ended.

    GET    /                                   the page
    GET    /api/state                          the session (references, targets, concept) and the model
    POST   /api/references                     upload a reference image (encoded now)
    DELETE /api/references/{id}
    GET    /api/references/{id}/image.jpg      the reference as the page shows it
    POST   /api/references/{id}/prompts        {"points": [[x, y, label], ...], "box": [x0, y0, x1, y1] | null}
    POST   /api/references/{id}/mask           upload its mask instead
    POST   /api/learn                          {"method": "persam" | "persam_f", "steps": 1000}
    GET    /api/concept                        download the concept file
    POST   /api/concept                        load a concept file
    POST   /api/targets                        upload target images (one or more)
    POST   /api/targets/folder                 {"path": "folder or glob on the server"} (--allow-folders)
    DELETE /api/targets[/{id}]
    GET    /api/targets/{id}/thumb.jpg
    POST   /api/targets/{id}/segment           {"multi": false, "max_objects": 5, "min_similarity": null}
    GET    /api/targets/{id}/overlay.jpg       the last result, gallery size
    GET    /api/targets/{id}/full.jpg          the last result at the image's full size
    GET    /api/targets/{id}/similarity.png    the heat map, on demand
    POST   /api/results.zip                    settings as for segment: masks, overlays, results.json, concept
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import sys
import threading
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Callable, List, Optional, Tuple
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..io import InputError
from .state import MAX_CLICKS, AppConfig, AppFull, AppState, NotFound, Session, SessionClosed, Settings

__all__ = ["create_app", "open_socket", "serve", "served_hosts", "is_loopback", "ServedHosts", "COOKIE"]

COOKIE = "persam_session"
STATIC = Path(__file__).resolve().parent / "static"
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WORKER_THREADS = 16  # requests worked on at once (each session's requests take turns anyway)
WORKER_NAME = "persam-app-request"
SHUTDOWN_GRACE_S = 3.0  # on Ctrl-C, requests in progress get this long to answer
SESSION_GONE = ("this page's session has ended (the server keeps a limited number of sessions and removed this one "
                "with its images, or it was restarted): reload the page to start again")
SESSION_EXPIRED_NOTE = ("Your earlier session on this server has ended (the server keeps a limited number of "
                        "sessions, or it was restarted) and its images were removed: start again.")
log = logging.getLogger("persam.app")

# Everything the page loads comes from this server: no fonts, scripts or styles from the web.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                               "style-src 'self'; connect-src 'self'; font-src 'self'; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


class SessionGone(Exception):
    """The request names no session: none yet (404), or one that has ended (410)."""

    def __init__(self, expired: bool) -> None:
        super().__init__(SESSION_GONE if expired else "nothing here: this browser has no session on the server yet "
                                                      "(it starts with the first image you add)")
        self.status = 410 if expired else 404


class ServerStopping(Exception):
    """The server stopped (Ctrl-C) while the request was worked on."""


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
# middleware (plain ASGI: they see the request body's stream, and every response)


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
            response = _error(421, f"this server answers to {self.hosts} only, not to the name {host!r} "
                                   f"(start it with --host NAME to serve another name)")
            return await response(scope, receive, send_with_headers)
        origin = headers.get("origin")
        if scope["method"] in STATE_CHANGING and origin is not None and not self._same_origin(origin):
            response = _error(403, f"refused: a page of another site ({origin}) may not change this app's sessions")
            return await response(scope, receive, send_with_headers)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            response = _error(413, self._too_large(f"{int(length) / 2**20:.0f} MB"))
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
            await _error(413, exc.detail)(scope, receive, send_with_headers)

    def _same_origin(self, origin: str) -> bool:
        parts = urlsplit(origin.strip())
        return parts.scheme == "http" and parts.netloc in self.hosts


class Sessions:
    """Finds the session of an /api/ request (scope state "session"; None when there is none).

    A POST without a session cookie starts a new session (503 when there is no room); the cookie
    is set only when the request succeeded or left something in it (else the session is dropped).
    A cookie naming a session that has ended: GET /api/state says so (and clears the cookie), any
    other request is refused with 410.  A session is "working" while its requests run."""

    def __init__(self, app, state: AppState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        cookie = _cookie(Headers(scope=scope))
        session = self.state.find(cookie)
        expired = bool(cookie) and session is None
        created = False
        if expired and scope["path"] != "/api/state":
            return await _error(410, SESSION_GONE, _clear_cookie())(scope, receive, send)
        if session is None and scope["method"] == "POST":
            try:
                session = self.state.new_session()
            except AppFull as exc:
                return await _error(503, str(exc))(scope, receive, send)
            created = True
        scope.setdefault("state", {}).update(session=session, session_expired=expired)
        status = None

        async def send_with_cookie(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if created and (status < 400 or not session.is_empty()):
                    headers.append("set-cookie", f"{COOKIE}={session.id}; HttpOnly; Path=/; SameSite=strict")
                elif expired:
                    headers.append("set-cookie", _clear_cookie()["set-cookie"])
            await send(message)

        if session is not None:
            session.begin()
        try:
            await self.app(scope, receive, send_with_cookie)
        finally:
            if session is not None:
                session.end()
                if created and (status is None or status >= 400) and session.is_empty():
                    self.state.discard(session)  # nobody was told of it


def _cookie(headers: Headers) -> Optional[str]:
    jar = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header names no session
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


def _clear_cookie() -> dict:
    return {"set-cookie": f'{COOKIE}=""; expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0; Path=/; SameSite=strict'}


class Workers:
    """Runs the page's blocking work in daemon threads, at most `limit` at once.

    Not the framework's thread pool: a request still running when the server stops (Ctrl-C) is
    abandoned, and its thread does not keep the process alive (a pool thread would: Python waits
    for it at exit, and the framework waits for it before its event loop ends)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots: Optional[asyncio.Semaphore] = None  # made in the server's event loop

    async def run(self, work: Callable[[], object]):
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        async with self._slots:
            loop = asyncio.get_running_loop()
            future = loop.create_future()

            def settle(ok: bool, value) -> None:
                if not future.done():
                    future.set_result(value) if ok else future.set_exception(value)

            def thread() -> None:
                try:
                    outcome = (True, work())
                except BaseException as exc:  # handed to the request, which answers it
                    outcome = (False, exc)
                try:
                    loop.call_soon_threadsafe(settle, *outcome)
                except RuntimeError:  # the server has stopped: nobody waits for the answer
                    pass

            threading.Thread(target=thread, name=WORKER_NAME, daemon=True).start()
            try:
                return await future
            except asyncio.CancelledError:  # the server is stopping and gave up waiting
                raise ServerStopping() from None


def busy_workers() -> int:
    """Requests whose work is still running (threads of Workers)."""
    return sum(t.name == WORKER_NAME and t.is_alive() for t in threading.enumerate())


# --------------------------------------------------------------------------------------------
# request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PromptsBody(_Body):
    points: List[Tuple[float, float, int]] = Field(default_factory=list, max_length=MAX_CLICKS)
    box: Optional[Tuple[float, float, float, float]] = None


class LearnBody(_Body):
    method: str = "persam"
    steps: int = 1000


class FolderBody(_Body):
    path: str = ""


class SettingsBody(_Body):
    multi: bool = False
    max_objects: int = 5
    min_similarity: Optional[float] = None

    def settings(self) -> Settings:
        return Settings.parse(self.model_dump())


# --------------------------------------------------------------------------------------------
# the app


def create_app(state: AppState, hosts: ServedHosts) -> FastAPI:
    """The page's FastAPI app over `state`, answering only to `hosts` (see :func:`served_hosts`)."""
    app = FastAPI(title="persam", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.persam = state
    upload_limit = int(state.config.max_upload_mb * 2**20)
    workers = Workers(WORKER_THREADS)
    app.add_middleware(Sessions, state=state)
    app.add_middleware(Gate, hosts=hosts, limit_bytes=upload_limit + 2**20, limit_mb=state.config.max_upload_mb)

    @app.exception_handler(InputError)
    @app.exception_handler(ValueError)
    async def bad_input(request: Request, exc: Exception):
        return _error(400, str(exc))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return _error(404, str(exc))

    @app.exception_handler(SessionGone)
    async def session_gone(request: Request, exc: SessionGone):
        return _error(exc.status, str(exc))

    @app.exception_handler(SessionClosed)
    async def session_closed(request: Request, exc: SessionClosed):
        return _error(410, SESSION_GONE)

    @app.exception_handler(ServerStopping)
    async def stopping(request: Request, exc: ServerStopping):
        return _error(503, "the server is stopping")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                             for e in exc.errors())
        return _error(422, f"bad request ({problems})")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.error("persam app: internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}: {exc}); the server keeps running, "
                           f"but this is a bug: please report it", headers=SECURITY_HEADERS)

    async def run(request: Request, work: Callable[[Session], object]):
        """work(session) under the session's lock, in a worker thread."""
        session: Optional[Session] = request.state.session
        if session is None:
            raise SessionGone(expired=request.state.session_expired)
        return await workers.run(lambda: session.run(work))

    def picture(data: bytes, media_type: str) -> Response:
        if not data:
            raise NotFound("no picture yet: run the targets first")
        return Response(data, media_type=media_type)

    # the page

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/state")
    async def get_state(request: Request):
        if request.state.session is None:  # no session yet: nothing is made by looking
            note = SESSION_EXPIRED_NOTE if request.state.session_expired else None
            return {"references": [], "targets": [], "concept": None, "session": False, "expired": note,
                    "app": state.status()}
        return {**await run(request, lambda s: s.state()), "session": True, "expired": None, "app": state.status()}

    # references

    @app.post("/api/references")
    async def add_reference(request: Request, file: UploadFile = File(...)):
        return await run(request, lambda s: s.add_reference(file.filename, file.file))

    @app.delete("/api/references/{ref_id}")
    async def remove_reference(request: Request, ref_id: str):
        await run(request, lambda s: s.remove_reference(ref_id))
        return {"removed": ref_id}

    @app.get("/api/references/{ref_id}/image.jpg")
    async def reference_image(request: Request, ref_id: str):
        return picture(await run(request, lambda s: s.reference(ref_id).preview), "image/jpeg")

    @app.post("/api/references/{ref_id}/prompts")
    async def set_prompts(request: Request, ref_id: str, body: Optional[PromptsBody] = None):
        body = body or PromptsBody()
        points = [list(p) for p in body.points]
        box = list(body.box) if body.box is not None else None
        return await run(request, lambda s: s.set_prompts(ref_id, points, box))

    @app.post("/api/references/{ref_id}/mask")
    async def set_mask(request: Request, ref_id: str, file: UploadFile = File(...)):
        return await run(request, lambda s: s.set_mask_file(ref_id, file.filename, file.file))

    # the concept

    @app.post("/api/learn")
    async def learn(request: Request, body: Optional[LearnBody] = None):
        body = body or LearnBody()
        return await run(request, lambda s: s.learn(body.method, body.steps))

    @app.get("/api/concept")
    async def download_concept(request: Request):
        name, data = await run(request, lambda s: s.concept_bytes())
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.post("/api/concept")
    async def upload_concept(request: Request, file: UploadFile = File(...)):
        return await run(request, lambda s: s.load_concept(file.filename, file.file))

    # targets

    @app.post("/api/targets")
    async def add_targets(request: Request, files: List[UploadFile] = File(...)):
        def work(s: Session):
            added, errors = [], []
            for f in files:  # one bad file does not spoil the others
                try:
                    added.append(s.add_target(f.filename, f.file))
                except InputError as exc:
                    errors.append(str(exc))
            if errors and not added:
                raise InputError("; ".join(errors))
            return {"targets": added, "errors": errors}

        return await run(request, work)

    @app.post("/api/targets/folder")
    async def add_folder(request: Request, body: Optional[FolderBody] = None):
        path = (body or FolderBody()).path
        added, notes = await run(request, lambda s: s.add_folder(path))
        return {"targets": added, "notes": notes}

    @app.delete("/api/targets")
    async def clear_targets(request: Request):
        await run(request, lambda s: s.clear_targets())
        return {"removed": "all"}

    @app.delete("/api/targets/{target_id}")
    async def remove_target(request: Request, target_id: str):
        await run(request, lambda s: s.remove_target(target_id))
        return {"removed": target_id}

    @app.get("/api/targets/{target_id}/thumb.jpg")
    async def target_thumb(request: Request, target_id: str):
        return picture(await run(request, lambda s: s.target(target_id).thumb), "image/jpeg")

    @app.post("/api/targets/{target_id}/segment")
    async def segment_target(request: Request, target_id: str, body: Optional[SettingsBody] = None):
        settings = (body or SettingsBody()).settings()
        return await run(request, lambda s: s.segment_target(target_id, settings))

    @app.get("/api/targets/{target_id}/overlay.jpg")
    async def target_overlay(request: Request, target_id: str):
        return picture(await run(request, lambda s: s.target(target_id).overlay), "image/jpeg")

    @app.get("/api/targets/{target_id}/full.jpg")
    async def target_full(request: Request, target_id: str):
        return picture(await run(request, lambda s: s.full_overlay(target_id)), "image/jpeg")

    @app.get("/api/targets/{target_id}/similarity.png")
    async def target_similarity(request: Request, target_id: str):
        return picture(await run(request, lambda s: s.similarity_png(target_id)), "image/png")

    @app.post("/api/results.zip")
    async def results_zip(request: Request, body: Optional[SettingsBody] = None):
        settings = (body or SettingsBody()).settings()
        data = await run(request, lambda s: s.results_zip(settings))
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="persam-results.zip"'})

    return app


# --------------------------------------------------------------------------------------------
# serving


def open_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: any free port); InputError when that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: unknown address ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # connections wait from now on (the URL is printed before the server runs)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another app there? "
                         f"use another --port") from None
    sock.set_inheritable(True)
    return sock


def serve(predictor, config: AppConfig, sock: socket.socket, host: Optional[str] = None, quiet: bool = False) -> int:
    """Serve the page on `sock` until Ctrl-C (SIGINT or SIGTERM); the uploads folder is removed at
    the end.  `host` is the name the server was started for (default: the socket's address);
    requests for other Host names are refused.  A request still running after a short grace is
    abandoned: it does not keep the process alive."""
    import uvicorn

    state = AppState(predictor, config)
    try:
        address, port = sock.getsockname()[:2]
        hosts = served_hosts(host if host is not None else address, port)
        app = create_app(state, hosts)
        shown = f"[{address}]" if ":" in address else address
        print(f"persam app: http://{shown}:{port}/ ({config.model_type} on {state.status()['device']}; Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=False,
                                               lifespan="off", timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn stops cleanly on Ctrl-C, then passes the signal on
            pass
        busy = busy_workers()
        cut_off = f" ({busy} request{'s' if busy > 1 else ''} still running cut off)" if busy else ""
        print(f"persam app: stopped{cut_off}", file=sys.stderr, flush=True)
    finally:
        state.close()
        sock.close()
    return 0
