"""HTTP pieces shared by the Serve apps: OpenAI-shaped errors for every failure (unknown routes
and methods too) and a capped request body."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.openai_protocol import MAX_BODY_BYTES, OpenAIError

log = logging.getLogger(__name__)


def install_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(OpenAIError)
    async def _openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @api.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        err = OpenAIError(f"internal error: {type(e).__name__}: {e}", status=500, type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(OpenAIError(str(e.detail), status=e.status_code, code=code).body(),
                            status_code=e.status_code)


async def read_capped(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused with a 413 past ``limit`` bytes (read in chunks: never more)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise OpenAIError(f"the request body exceeds {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OpenAIError(f"the request body exceeds {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)
