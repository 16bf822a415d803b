"""OpenAI-style errors: every failure leaves the server as ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("nova_server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """An error with its HTTP status; ``param`` names the offending field (``input[3]``, ``dimensions``)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def __reduce__(self) -> tuple:
        """Pickled by its fields: an HTTP process (``frontend.py``) receives it from the model's process."""
        return _rebuilt_api_error, (self.status, self.message, self.param, self.code, self.headers)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, headers=self.headers)


def _rebuilt_api_error(status: int, message: str, param: str | None, code: str | None,
                       headers: dict[str, str]) -> ApiError:
    return ApiError(status, message, param=param, code=code, headers=headers)


def error_response(
    status: int, message: str, *, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The JSON body OpenAI's clients parse into their exception's ``message``/``type``/``param``/``code``."""
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def item_param(index: int, single_input: bool) -> str:
    """``input`` for a request whose input was one string, else ``input[i]``."""
    return "input" if single_input else f"input[{index}]"


def item_error(index: int, problem: str, single_input: bool) -> ApiError:
    """A 400 naming the item and the problem."""
    param = item_param(index, single_input)
    return ApiError(400, f"{param}: {problem}", param=param, code="invalid_input")


def as_item_error(error: Exception, single_input: bool) -> ApiError | None:
    """The processor's ``ItemError`` (duck-typed: remote code lives in a dynamic module) as a 400, else None."""
    index, problem = getattr(error, "index", None), getattr(error, "problem", None)
    if isinstance(error, ValueError) and isinstance(index, int) and isinstance(problem, str):
        return item_error(index, problem, single_input)
    return None


def install_error_handlers(app: FastAPI) -> None:
    """Route every error (ours, FastAPI's 404/405/422, unexpected ones) through the OpenAI-style body."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        return error_response(400, f"{param}: {first['msg']}" if param else first["msg"], param=param,
                              code="invalid_value")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error", exc_info=error)
        return error_response(500, "internal server error (see the server log)", code="internal_error")
