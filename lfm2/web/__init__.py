"""The chat page of `lfm2 serve`: `GET /` and its assets, served from files inside the package.

The page (sources in `webui/`, built by `cd webui && npm ci && npm run build` into `static/`, which
is committed) talks only to the server it came from: the OpenAI-compatible `/v1/chat/completions`
for replies and `/web/info` for what the page cannot learn from the OpenAI API (the checkpoint's
sampling defaults, the context length, what the model can take). So `pip install lfm2` is enough
to use it offline: no Node, no CDN.

Every answer here carries a Content-Security-Policy that allows scripts, styles and connections
from this origin only and no inline script, so that model output which slipped through the page's
sanitizer still could not run or send anything elsewhere. Images may also be `data:`/`blob:` URLs
(attachments the user picks, shown before they are sent). The routes are left out of
`/openapi.json`: they are not part of the API.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lfm2.errors import LFM2Error
from lfm2.sampling import SamplingParams

if TYPE_CHECKING:
    from fastapi import FastAPI

STATIC = Path(__file__).resolve().parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new lfm2 version's page must not run against a stale app.js
}
SAMPLING_FIELDS = ("temperature", "min_p", "repetition_penalty", "top_p", "top_k")


def page_info(model_name: str, defaults: SamplingParams, max_len: int, vision: bool = False) -> dict[str, Any]:
    """What `/web/info` answers: the served model's name and context, the checkpoint's sampling
    defaults (the settings panel starts from them), and what the model takes besides text.

    `vision` is True for LFM2-VL checkpoints, whose chat endpoint takes image parts as data URLs
    (what the page sends); the page offers image attachments only where a server says it can take them.
    """
    return {
        "model": model_name,
        "max_model_len": max_len,
        "defaults": {name: getattr(defaults, name) for name in SAMPLING_FIELDS},
        "capabilities": {"tools": True, "vision": vision},
    }


def load_static(folder: Path = STATIC) -> dict[str, tuple[bytes, str]]:
    """The page's files by name, with their content types: read once, they are a few hundred KB.

    Served from this table by name only, so that no request path can reach another file.
    """
    files = {path.name: (path.read_bytes(), CONTENT_TYPES[path.suffix])
             for path in sorted(folder.glob("*")) if path.suffix in CONTENT_TYPES and path.is_file()}
    if "index.html" not in files:
        raise LFM2Error(f"{folder / 'index.html'} is missing, so `lfm2 serve` has no chat page: reinstall lfm2, or "
                        "rebuild the page with `cd webui && npm ci && npm run build`")
    return files


def add_routes(app: "FastAPI", model_name: str, defaults: SamplingParams, max_len: int, vision: bool = False) -> None:
    """Add `GET /` (the page), `GET /static/{name}` (its assets) and `GET /web/info` to `app`;
    `vision`: the model takes images (the page then offers attachments)."""
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    files = load_static()
    info = page_info(model_name, defaults, max_len, vision)

    def serve(name: str) -> Response:
        if name not in files:
            raise HTTPException(404)
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=HEADERS)

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return serve("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        return serve(name)

    @app.get("/web/info", include_in_schema=False)
    async def web_info() -> JSONResponse:
        return JSONResponse(info, headers=HEADERS)
