"""The web page at `/`: a small offline page (plain HTML/CSS/JS in app/static) that calls POST /classify and
GET /v1/model like any other client.

Assets are served by explicit routes rather than a StaticFiles mount because `include_router` copies routes, not
mounts; the allow-list also keeps anything else that lands in app/static from being served by accident.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# file name -> media type; the only files this router will ever serve
ASSETS: dict[str, str] = {
    "app.css": "text/css; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
}

# Everything the page needs comes from this origin; no inline script, no third-party hosts. `data:`/`blob:` for the
# heatmap PNG (base64 from the API) and the previews of the user's own files.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)

# Assets are small and change with the package: revalidate instead of caching stale copies across upgrades.
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}

router = APIRouter(tags=["ui"])


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    """The page itself."""
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={**HEADERS, "Content-Security-Policy": CONTENT_SECURITY_POLICY},
    )


@router.get("/static/{name}", include_in_schema=False)
def static_asset(name: str) -> FileResponse:
    """One of the page's assets (CSS, JS), by exact name."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(status_code=404, detail=f"no such asset: {name}")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=HEADERS)
