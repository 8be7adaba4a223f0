"""The HTTP side of ``persam app``: FastAPI routes over :mod:`persam.app.state`, and :func:`serve`.

Routes only translate HTTP: they find the browser's session (cookie ``persam_session``), hold its
lock, call one :class:`~persam.app.state.Session` method and turn its answer into JSON, an image or
a file.  Errors come back as ``{"error": "one line"}``: 400 bad input, 404 unknown id, 413 too
large, 500 a bug (logged; the server keeps serving).

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
    POST   /api/targets/folder                 {"path": "folder or glob on the server"}
    DELETE /api/targets[/{id}]
    GET    /api/targets/{id}/thumb.jpg
    POST   /api/targets/{id}/segment           {"multi": false, "max_objects": 5, "min_similarity": null}
    GET    /api/targets/{id}/overlay.jpg
    GET    /api/targets/{id}/similarity.png    the heat map, on demand
    POST   /api/results.zip                    settings as for segment: masks, overlays, results.json, concept
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from pathlib import Path
from typing import List, Optional

from fastapi import Body, FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from ..io import InputError
from .state import AppConfig, AppState, NotFound, Session, Settings

__all__ = ["create_app", "open_socket", "serve", "is_loopback", "COOKIE"]

COOKIE = "persam_session"
STATIC = Path(__file__).resolve().parent / "static"
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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def create_app(state: AppState) -> FastAPI:
    app = FastAPI(title="persam", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.persam = state
    upload_limit = int(state.config.max_upload_mb * 2**20)

    @app.middleware("http")
    async def sessions_and_limits(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > upload_limit + 2**20:
            response = _error(413, f"the upload is {int(length) / 2**20:.0f} MB, larger than the app's limit of "
                                   f"{state.config.max_upload_mb:g} MB")
        else:
            created = False
            if request.url.path.startswith("/api/"):
                session, created = state.session(request.cookies.get(COOKIE))
                request.state.session = session
            response = await call_next(request)
            if created:
                response.set_cookie(COOKIE, request.state.session.id, httponly=True, samesite="strict", path="/")
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @app.exception_handler(InputError)
    @app.exception_handler(ValueError)
    async def bad_input(request: Request, exc: Exception):
        return _error(400, str(exc))

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return _error(404, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                             for e in exc.errors())
        return _error(400, f"bad request ({problems})")

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        log.error("persam app: internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}: {exc}); the server keeps running, "
                           f"but this is a bug: please report it")

    def run(request: Request, work):
        session: Session = request.state.session
        with session.lock:
            return work(session)

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
    def get_state(request: Request):
        return run(request, lambda s: {**s.state(), "app": state.status()})

    # references

    @app.post("/api/references")
    def add_reference(request: Request, file: UploadFile = File(...)):
        return run(request, lambda s: s.add_reference(file.filename, file.file))

    @app.delete("/api/references/{ref_id}")
    def remove_reference(request: Request, ref_id: str):
        run(request, lambda s: s.remove_reference(ref_id))
        return {"removed": ref_id}

    @app.get("/api/references/{ref_id}/image.jpg")
    def reference_image(request: Request, ref_id: str):
        return picture(run(request, lambda s: s.reference(ref_id).preview), "image/jpeg")

    @app.post("/api/references/{ref_id}/prompts")
    def set_prompts(request: Request, ref_id: str, body: dict = Body(default={})):
        return run(request, lambda s: s.set_prompts(ref_id, body.get("points"), body.get("box")))

    @app.post("/api/references/{ref_id}/mask")
    def set_mask(request: Request, ref_id: str, file: UploadFile = File(...)):
        return run(request, lambda s: s.set_mask_file(ref_id, file.filename, file.file))

    # the concept

    @app.post("/api/learn")
    def learn(request: Request, body: dict = Body(default={})):
        steps = body.get("steps", 1000)
        return run(request, lambda s: s.learn(str(body.get("method", "persam")), steps))

    @app.get("/api/concept")
    def download_concept(request: Request):
        name, data = run(request, lambda s: s.concept_bytes())
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.post("/api/concept")
    def upload_concept(request: Request, file: UploadFile = File(...)):
        return run(request, lambda s: s.load_concept(file.filename, file.file))

    # targets

    @app.post("/api/targets")
    def add_targets(request: Request, files: List[UploadFile] = File(...)):
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

        return run(request, work)

    @app.post("/api/targets/folder")
    def add_folder(request: Request, body: dict = Body(default={})):
        return {"targets": run(request, lambda s: s.add_folder(str(body.get("path") or "")))}

    @app.delete("/api/targets")
    def clear_targets(request: Request):
        run(request, lambda s: s.clear_targets())
        return {"removed": "all"}

    @app.delete("/api/targets/{target_id}")
    def remove_target(request: Request, target_id: str):
        run(request, lambda s: s.remove_target(target_id))
        return {"removed": target_id}

    @app.get("/api/targets/{target_id}/thumb.jpg")
    def target_thumb(request: Request, target_id: str):
        return picture(run(request, lambda s: s.target(target_id).thumb), "image/jpeg")

    @app.post("/api/targets/{target_id}/segment")
    def segment_target(request: Request, target_id: str, body: dict = Body(default={})):
        settings = Settings.parse(body)
        return run(request, lambda s: s.segment_target(target_id, settings))

    @app.get("/api/targets/{target_id}/overlay.jpg")
    def target_overlay(request: Request, target_id: str):
        return picture(run(request, lambda s: s.target(target_id).overlay), "image/jpeg")

    @app.get("/api/targets/{target_id}/similarity.png")
    def target_similarity(request: Request, target_id: str):
        return picture(run(request, lambda s: s.similarity_png(target_id)), "image/png")

    @app.post("/api/results.zip")
    def results_zip(request: Request, body: dict = Body(default={})):
        settings = Settings.parse(body)
        data = run(request, lambda s: s.results_zip(settings))
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="persam-results.zip"'})

    return app


# --------------------------------------------------------------------------------------------
# serving


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.x, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0: any free port); InputError when that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: unknown address ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another app there? "
                         f"use another --port") from None
    sock.set_inheritable(True)
    return sock


def serve(predictor, config: AppConfig, sock: socket.socket, quiet: bool = False) -> int:
    """Serve the page on `sock` until Ctrl-C; the uploads folder is removed at the end."""
    import uvicorn

    state = AppState(predictor, config)
    try:
        app = create_app(state)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"persam app: http://{shown}:{port}/ ({config.model_type} on {state.status()['device']}; Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=False,
                                               lifespan="off"))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn stops cleanly on Ctrl-C, then passes the signal on
            pass
        print("persam app: stopped", file=sys.stderr, flush=True)
    finally:
        state.close()
        sock.close()
    return 0
