"""The tenant dashboard at /dashboard: a static page (shipped in the package, no CDN) that uses
only the public API with the key the tenant pastes, kept in the tab's sessionStorage.

Its "login" is the page's first authenticated call: an API key new to the gateway is checked
at the token exchange, which the client guard limits per client IP (slowapi), so guessing
keys through the dashboard costs what guessing them anywhere else does.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import Response

from narthex.common.errors import NotFound

router = APIRouter(include_in_schema=False)

_ASSETS = files("narthex.gateway") / "dashboard"
_TYPES = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
# Scripts, styles and calls to this origin only: a page that holds a key runs nothing else.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
        " img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_PAGES = {name: _ASSETS.joinpath(name).read_bytes() for name in ("index.html", *_TYPES)}


@router.get("/dashboard")
async def dashboard() -> Response:
    return Response(_PAGES["index.html"], media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/dashboard/{asset}")
async def dashboard_asset(asset: str) -> Response:
    media_type = _TYPES.get(asset)
    if media_type is None:
        raise NotFound("no such dashboard file")
    return Response(_PAGES[asset], media_type=media_type, headers=_HEADERS)
