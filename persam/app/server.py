"""The HTTP side of ``persam app``: FastAPI routes over :mod:`persam.app.state`, and :func:`serve`.

Routes only translate HTTP: they find the browser's session (cookie ``persam_session``), run one
:class:`~persam.app.session.Session` method under its lock in a worker thread and turn its answer
into JSON, an image or a file.  Errors come back as ``{"error": "one line"}``: 400 bad input,
403 a foreign Origin, 404 unknown id, 410 the session has ended, 413 too large, 421 a Host name
the server was not started for, 422 a request body of the wrong shape (the field named), 503 no
room for a new session, 500 a bug (logged; the server keeps serving).

What protects the user's machine is :mod:`persam.app.guard` (Host names, Origins, sizes) and
:mod:`persam.app.cookie` (sessions made only by a person's state-changing request).

    GET    /                                   the page
    GET    /api/state                          the session (references, targets, concept) and the model
    POST   /api/references                     upload a reference image (encoded now)
    DELETE /api/references/{id}
    GET    /api/references/{id}/image.jpg      the reference as the page shows it
    POST   /api/references/{id}/prompts        {"points": [[x, y, label], ...], "box": [x0, y0, x1, y1] | null}
    POST   /api/references/{id}/mask           upload its mask instead
    POST   /api/learn                          {"method": "persam" | "persam_f" | "gfsam", "steps": 1000}
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
import logging
import socket
import sys
import threading
from pathlib import Path
from typing import Awaitable, Callable, List, Optional, Tuple

from fastapi import APIRouter, FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from persam.app.cookie import SESSION_GONE, SessionGone, Sessions
from persam.app.guard import SECURITY_HEADERS, Gate, ServedHosts, error_response, served_hosts
from persam.app.session import Session
from persam.app.settings import MAX_CLICKS, AppConfig, NotFound, SessionClosed, Settings
from persam.app.state import AppState
from persam.errors import InputError, SettingError

__all__ = ["create_app", "open_socket", "serve"]

STATIC = Path(__file__).resolve().parent / "static"
WORKER_THREADS = 16  # requests worked on at once (each session's requests take turns anyway)
WORKER_NAME = "persam-app-request"
SHUTDOWN_GRACE_S = 3.0  # on Ctrl-C, requests in progress get this long to answer
SESSION_EXPIRED_NOTE = ("Your earlier session on this server has ended (the server keeps a limited number of "
                        "sessions, or it was restarted) and its images were removed: start again.")
log = logging.getLogger("persam.app")


class ServerStopping(Exception):
    """The server stopped (Ctrl-C) while the request was worked on."""


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
    app.add_middleware(Sessions, state=state)
    app.add_middleware(Gate, hosts=hosts, limit_bytes=upload_limit + 2**20, limit_mb=state.config.max_upload_mb)
    _add_error_handlers(app)
    run = _session_runner(Workers(WORKER_THREADS))
    app.include_router(_page_routes(state, run))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(_reference_routes(run))
    app.include_router(_target_routes(run))
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answered as one JSON line with its HTTP status (a bug as 500, logged)."""
    @app.exception_handler(InputError)
    @app.exception_handler(ValueError)
    async def bad_input(request: Request, exc: Exception):
        return error_response(400, str(exc))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return error_response(404, str(exc))

    @app.exception_handler(SessionGone)
    async def session_gone(request: Request, exc: SessionGone):
        return error_response(exc.status, str(exc))

    @app.exception_handler(SessionClosed)
    async def session_closed(request: Request, exc: SessionClosed):
        return error_response(410, SESSION_GONE)

    @app.exception_handler(ServerStopping)
    async def stopping(request: Request, exc: ServerStopping):
        return error_response(503, "the server is stopping")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                             for e in exc.errors())
        return error_response(422, f"bad request ({problems})")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.error("persam app: internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error ({type(exc).__name__}: {exc}); the server keeps running, "
                                   f"but this is a bug: please report it", headers=SECURITY_HEADERS)


Runner = Callable[[Request, Callable[[Session], object]], Awaitable[object]]


def _session_runner(workers: Workers) -> Runner:
    async def run(request: Request, work: Callable[[Session], object]):
        """work(session) under the session's lock, in a worker thread."""
        session: Optional[Session] = request.state.session
        if session is None:
            raise SessionGone(expired=request.state.session_expired)
        return await workers.run(lambda: session.run(work))

    return run


def _picture(data: bytes, media_type: str) -> Response:
    if not data:
        raise NotFound("no picture yet: run the targets first")
    return Response(data, media_type=media_type)


def _page_routes(state: AppState, run: Runner) -> APIRouter:
    """The page and the session's state."""
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @router.get("/api/state")
    async def get_state(request: Request):
        if request.state.session is None:  # no session yet: nothing is made by looking
            note = SESSION_EXPIRED_NOTE if request.state.session_expired else None
            return {"references": [], "targets": [], "concept": None, "session": False, "expired": note,
                    "app": state.status()}
        return {**await run(request, lambda s: s.state()), "session": True, "expired": None, "app": state.status()}

    return router


def _reference_routes(run: Runner) -> APIRouter:
    """The reference photos, their prompts or masks, and the concept learned from them."""
    router = APIRouter()

    @router.post("/api/references")
    async def add_reference(request: Request, file: UploadFile = File(...)):
        return await run(request, lambda s: s.add_reference(file.filename, file.file))

    @router.delete("/api/references/{ref_id}")
    async def remove_reference(request: Request, ref_id: str):
        await run(request, lambda s: s.remove_reference(ref_id))
        return {"removed": ref_id}

    @router.get("/api/references/{ref_id}/image.jpg")
    async def reference_image(request: Request, ref_id: str):
        return _picture(await run(request, lambda s: s.reference(ref_id).preview), "image/jpeg")

    @router.post("/api/references/{ref_id}/prompts")
    async def set_prompts(request: Request, ref_id: str, body: Optional[PromptsBody] = None):
        body = body or PromptsBody()
        points = [list(p) for p in body.points]
        box = list(body.box) if body.box is not None else None
        return await run(request, lambda s: s.set_prompts(ref_id, points, box))

    @router.post("/api/references/{ref_id}/mask")
    async def set_mask(request: Request, ref_id: str, file: UploadFile = File(...)):
        return await run(request, lambda s: s.set_mask_file(ref_id, file.filename, file.file))

    # the concept

    @router.post("/api/learn")
    async def learn(request: Request, body: Optional[LearnBody] = None):
        body = body or LearnBody()
        return await run(request, lambda s: s.learn(body.method, body.steps))

    @router.get("/api/concept")
    async def download_concept(request: Request):
        name, data = await run(request, lambda s: s.concept_bytes())
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @router.post("/api/concept")
    async def upload_concept(request: Request, file: UploadFile = File(...)):
        return await run(request, lambda s: s.load_concept(file.filename, file.file))

    return router


def _target_routes(run: Runner) -> APIRouter:
    """The target photos, their results and the zip of them all."""
    router = APIRouter()

    @router.post("/api/targets")
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

    @router.post("/api/targets/folder")
    async def add_folder(request: Request, body: Optional[FolderBody] = None):
        path = (body or FolderBody()).path
        added, notes = await run(request, lambda s: s.add_folder(path))
        return {"targets": added, "notes": notes}

    @router.delete("/api/targets")
    async def clear_targets(request: Request):
        await run(request, lambda s: s.clear_targets())
        return {"removed": "all"}

    @router.delete("/api/targets/{target_id}")
    async def remove_target(request: Request, target_id: str):
        await run(request, lambda s: s.remove_target(target_id))
        return {"removed": target_id}

    @router.get("/api/targets/{target_id}/thumb.jpg")
    async def target_thumb(request: Request, target_id: str):
        return _picture(await run(request, lambda s: s.target(target_id).thumb), "image/jpeg")

    @router.post("/api/targets/{target_id}/segment")
    async def segment_target(request: Request, target_id: str, body: Optional[SettingsBody] = None):
        settings = (body or SettingsBody()).settings()
        return await run(request, lambda s: s.segment_target(target_id, settings))

    @router.get("/api/targets/{target_id}/overlay.jpg")
    async def target_overlay(request: Request, target_id: str):
        return _picture(await run(request, lambda s: s.target(target_id).overlay), "image/jpeg")

    @router.get("/api/targets/{target_id}/full.jpg")
    async def target_full(request: Request, target_id: str):
        return _picture(await run(request, lambda s: s.full_overlay(target_id)), "image/jpeg")

    @router.get("/api/targets/{target_id}/similarity.png")
    async def target_similarity(request: Request, target_id: str):
        return _picture(await run(request, lambda s: s.similarity_png(target_id)), "image/png")

    @router.post("/api/results.zip")
    async def results_zip(request: Request, body: Optional[SettingsBody] = None):
        settings = (body or SettingsBody()).settings()
        data = await run(request, lambda s: s.results_zip(settings))
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="persam-results.zip"'})

    return router


# --------------------------------------------------------------------------------------------
# serving


def open_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (port 0: any free port); InputError when that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SettingError(f"{{host}} {host}: unknown address ({exc.strerror})", "host") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)  # connections wait from now on (the URL is printed before the server runs)
    except OSError as exc:
        sock.close()
        raise SettingError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another app there? "
                           f"use another {{port}}", "port") from None
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
