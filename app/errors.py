"""The one error hierarchy of the server.

Every failure anywhere in the request path is raised as a :class:`ServingError` subclass. Only
:func:`error_response` (used by the ingress's exception handlers and the SSE error frame) turns one into
the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``; handlers never build error JSON.

The classes import nothing but the standard library so that model deployments can raise them too: Ray
carries an exception raised in a replica back to the caller, where ``isinstance`` still matches.
"""

from __future__ import annotations

from typing import Any


class ServingError(Exception):
    """Base of every error the server answers with. Subclasses fix the HTTP status and OpenAI type."""

    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers or {})

    def __reduce__(self):
        # Keyword-only arguments do not survive Exception's default pickling; Ray pickles errors.
        return (_rebuild, (type(self), self.message, self.param, self.code, self.headers))

    def body(self) -> dict[str, Any]:
        """The OpenAI ``ErrorResponse`` body for this error."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}


def _rebuild(cls, message, param, code, headers):
    err = cls.__new__(cls)
    ServingError.__init__(err, message, param=param, code=code, headers=headers)
    return err


class InvalidRequest(ServingError):
    """The request is malformed or asks for something impossible (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """The prompt, or prompt plus the requested completion, does not fit the model's context (400)."""

    default_code = "context_length_exceeded"


class AuthenticationFailed(ServingError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class NotFound(ServingError):
    """An unknown route or resource (404)."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    """The ``model`` field names no model this server serves (404)."""

    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist or is not served here.", param="model")


class ModelTaskMismatch(NotFound):
    """The model exists but serves another task than the endpoint's (404, as OpenAI answers "This is
    not a chat model...")."""

    default_code = "model_task_mismatch"

    def __init__(self, model: str, serves: str, needed: str) -> None:
        super().__init__(f"The model '{model}' is a {serves} model and cannot serve this endpoint, which "
                         f"needs a {needed} model.", param="model")


class MethodNotAllowed(ServingError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTooLarge(ServingError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class Overloaded(ServingError):
    """A model's queue is full; the client should retry after ``retry_after_s`` seconds (503)."""

    status_code = 503
    error_type = "server_overloaded"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs: Any) -> None:
        headers = kwargs.pop("headers", None) or {"Retry-After": str(retry_after_s)}
        super().__init__(message, headers=headers, **kwargs)


class ReplicaUnavailable(ServingError):
    """The model replica handling the request died or cannot be reached (503, always: not a rate limit)."""

    status_code = 503
    error_type = "server_error"
    default_code = "replica_unavailable"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, headers=kwargs.pop("headers", None) or {"Retry-After": "1"}, **kwargs)


class ModelLoadFailed(ServingError):
    """An on-demand model could not be loaded (500, ``model_load_failed``); the next request for it tries
    again. The message names the model and the cause, never a traceback."""

    status_code = 500
    error_type = "server_error"
    default_code = "model_load_failed"


class ModelLoading(ServingError):
    """A request waited longer than the load timeout for its on-demand model (503 with Retry-After); the
    load goes on, so a retry may find the model loaded."""

    status_code = 503
    error_type = "server_error"
    default_code = "model_loading"

    def __init__(self, message: str, *, retry_after_s: int = 5, **kwargs: Any) -> None:
        headers = kwargs.pop("headers", None) or {"Retry-After": str(retry_after_s)}
        super().__init__(message, headers=headers, **kwargs)


class RequestTimedOut(ServingError):
    status_code = 504
    error_type = "timeout_error"
    default_code = "timeout"


class InternalError(ServingError):
    """An unexpected failure; the message is generic, details go to the server log only (500)."""

    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"


def as_serving_error(exc: BaseException) -> ServingError:
    """Map any exception reaching the ingress to the ServingError the client sees.

    Ray wraps a replica's exception in ``RayTaskError`` (whose ``cause`` is the original) and reports
    backpressure and dead replicas with its own types; this is the one place that knows them.
    """
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    cause = getattr(exc, "cause", None)
    if isinstance(cause, ServingError):
        return cause
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, serve_exc.BackPressureError):
        return Overloaded("The model is at capacity and its queue is full; retry shortly.")
    if isinstance(exc, (ray_exc.ActorDiedError, ray_exc.ActorUnavailableError, ray_exc.RayActorError)):
        return ReplicaUnavailable("The model replica serving this request became unavailable; retry "
                                  "shortly.")
    return InternalError("The server had an unexpected error while processing the request.")


def render(err: ServingError, settings: Any = None):
    """The HTTP response for ``err``: the OpenAI error body, its status and headers.

    ``settings`` (the ingress's IngressSpec) chooses the status and Retry-After of overload answers.
    """
    from fastapi.responses import JSONResponse

    status, headers = err.status_code, dict(err.headers)
    if isinstance(err, Overloaded) and settings is not None:
        status, headers["Retry-After"] = settings.overload_status, str(settings.retry_after_s)
    return JSONResponse(err.body(), status_code=status, headers=headers)


def install_error_handlers(app) -> None:
    """Make every error answer of the FastAPI ``app`` an OpenAI ``ErrorResponse``.

    ``app.state.settings`` (an IngressSpec), when set, shapes overload answers (see :func:`render`).
    """
    import logging

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    logger = logging.getLogger("app.errors")
    by_status = {404: NotFound, 405: MethodNotAllowed, 413: RequestTooLarge}

    def answer(request, err: ServingError):
        return render(err, getattr(request.app.state, "settings", None))

    async def on_serving_error(request, exc: ServingError):
        return answer(request, for_client(exc))

    async def on_validation_error(request, exc: RequestValidationError):
        return answer(request, validation_error(exc.errors()))

    async def on_http_error(request, exc: HTTPException):
        cls = by_status.get(exc.status_code, InvalidRequest if exc.status_code < 500 else InternalError)
        err = cls(str(exc.detail) if exc.detail else "error")
        err.status_code = exc.status_code
        return answer(request, err)

    async def on_unexpected(request, exc: Exception):
        err = as_serving_error(exc)
        if isinstance(err, InternalError):
            logger.error("unhandled error on %s %s (request id %s)", request.method, request.url.path,
                         current_request_id(), exc_info=exc)
        return answer(request, for_client(err))

    app.add_exception_handler(ServingError, on_serving_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)


def for_client(err: ServingError) -> ServingError:
    """What the client sees of ``err``: a 500 also names the request id, to find it in the logs."""
    if isinstance(err, InternalError) and "request id" not in err.message:
        return InternalError(f"{err.message} (request id {current_request_id()})")
    return err


def current_request_id() -> str:
    """The id Ray Serve gave this request (also sent to the client as the x-request-id header)."""
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or "unknown"
    except Exception:
        return "unknown"


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal", "union"}


def validation_error(errors: list[dict[str, Any]]) -> InvalidRequest:
    """An InvalidRequest naming the first offending parameter of a pydantic/FastAPI error list."""
    if not errors:
        return InvalidRequest("Invalid request.")
    first = errors[0]
    loc = []
    for part in first.get("loc", ())[1:] if first.get("loc", ("",))[0] == "body" else first.get("loc", ()):
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part.startswith("function-")):
            break  # pydantic names union branches in the location; they are no parameter names
        loc.append(part)
    if first.get("type") == "json_invalid":
        return InvalidRequest("We could not parse the JSON body of your request: "
                              f"{first.get('ctx', {}).get('error', 'invalid JSON')}.", code="invalid_json")
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not param:
        return InvalidRequest(f"Invalid request body: {msg}")
    return InvalidRequest(f"Invalid value for '{param}': {msg}", param=param)
