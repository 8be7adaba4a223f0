"""Which session a request belongs to: the ``persam_session`` cookie, and the :class:`Sessions`
middleware that finds the session of an /api/ request, starts one on a person's first
state-changing request (never on a GET), drops it again when that request left nothing, and says
when a session has ended.  A new session never replaces a working one (:mod:`persam.app.state`).
"""

from __future__ import annotations

from http.cookies import SimpleCookie
from typing import Optional

from starlette.datastructures import Headers, MutableHeaders

from persam.app.guard import error_response
from persam.app.settings import AppFull
from persam.app.state import AppState

COOKIE = "persam_session"
SESSION_GONE = ("this page's session has ended (the server keeps a limited number of sessions and removed this one "
                "with its images, or it was restarted): reload the page to start again")


class SessionGone(Exception):
    """The request names no session: none yet (404), or one that has ended (410)."""

    def __init__(self, expired: bool) -> None:
        super().__init__(SESSION_GONE if expired else "nothing here: this browser has no session on the server yet "
                                                      "(it starts with the first image you add)")
        self.status = 410 if expired else 404


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
            return await error_response(410, SESSION_GONE, _clear_cookie())(scope, receive, send)
        if session is None and scope["method"] == "POST":
            try:
                session = self.state.new_session()
            except AppFull as exc:
                return await error_response(503, str(exc))(scope, receive, send)
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
