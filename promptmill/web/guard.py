"""Who may use the viewer: whoever holds its token, as Jupyter does. The token comes once in the URL
(it is then kept in a cookie for this port, and the URL loses it), or in an `Authorization: token T`
header; anything else is refused. Actions are POSTs that carry a CSRF value derived from the token,
from a page of ours (Origin). Every answer forbids framing and scripts from anywhere but the viewer."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

#: Scripts only from the viewer itself (no inline script: a figure is data a script of ours draws).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


#: The names the viewer answers to (its --host too): a request naming another host is refused.
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def _host_name(header: str) -> str:
    """The host of a Host header, without its port (`[::1]:8686` -> `::1`)."""
    if header.startswith("["):
        return header[1 : header.find("]")].lower() if "]" in header else ""
    return header.rsplit(":", 1)[0].lower() if header.count(":") == 1 else header.lower()


def new_token() -> str:
    return secrets.token_urlsafe(24)


def csrf_value(token: str) -> str:
    """What an action's form carries: derived from the token, so a page without it cannot forge one."""
    return hmac.new(token.encode(), b"promptmill-ui-csrf", hashlib.sha256).hexdigest()


class TokenGuard:
    """ASGI middleware: refuse any request without the token, and an action without its CSRF value."""

    def __init__(self, app: ASGIApp, token: str, cookie: str, hosts: frozenset[str] = LOCAL_HOSTS):
        self.app, self.token, self.cookie, self.hosts = app, token, cookie, hosts

    def _holds(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(offered.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        if _host_name(request.headers.get("host", "")) not in self.hosts:
            # A page elsewhere whose name was pointed at 127.0.0.1 (DNS rebinding) names itself here.
            refused = PlainTextResponse("403: this viewer answers to its own address only", status_code=403)
            await refused(scope, receive, _with_headers(send))
            return
        in_url = request.query_params.get("token")
        header = request.headers.get("authorization", "")
        offered = header[6:] if header.startswith("token ") else request.cookies.get(self.cookie)
        if self._holds(in_url) and request.method == "GET":
            # Keep the token in a cookie for this port and drop it from the address bar and history.
            rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            path = "/" + request.url.path.lstrip("/\\")  # never `//elsewhere`: a redirect stays on this origin
            response: Response = RedirectResponse(path + (f"?{rest}" if rest else ""), status_code=303)
            response.set_cookie(self.cookie, self.token, httponly=True, samesite="strict", path="/")
        elif not self._holds(offered):
            response = PlainTextResponse(
                "403: this viewer needs its token: open the URL `promptmill ui` printed", status_code=403
            )
        elif request.method == "POST" and not await self._forms_ours(request):
            response = PlainTextResponse("403: this action did not come from the viewer's own page", status_code=403)
        else:
            await self.app(scope, _receive_again(request), _with_headers(send))
            return
        await response(scope, receive, _with_headers(send))

    async def _forms_ours(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host')}":
            return False
        await request.body()  # kept for the app, which reads the form again
        form = await request.form()
        offered = form.get("csrf")
        return isinstance(offered, str) and hmac.compare_digest(offered, csrf_value(self.token))


def _receive_again(request: Request) -> Receive:
    """The body already read (for the CSRF check) is given again to the app."""
    body = getattr(request, "_body", None)
    if body is None:
        return request.receive

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _with_headers(send: Send) -> Send:
    async def sending(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            headers += [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()]
            message = {**message, "headers": headers}
        await send(message)

    return sending
