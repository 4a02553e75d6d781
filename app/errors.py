"""The one error hierarchy of the server.

Every failure anywhere in the request path is raised as a :class:`ServingError` subclass. Only
:func:`error_response` (used by the ingress's exception handlers and the SSE error frame) turns one into
the OpenAI error body ``{"error": {"message", "type", "param", "code"}}``; handlers never build error JSON.

The classes import nothing but the standard library so that model deployments can raise them too: Ray
carries an exception raised in a replica back to the caller, where ``isinstance`` still matches.
"""

from __future__ import annotations

import logging
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
        """The OpenAI ``ErrorResponse`` body for this error (text that echoes a client's invalid Unicode
        is made encodable, so rendering an error can never fail)."""
        return {"error": {"message": _encodable(self.message), "type": self.error_type,
                          "param": _encodable(self.param), "code": self.code}}


def _encodable(text: str | None) -> str | None:
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "replace").decode("utf-8")


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

    @classmethod
    def text_too_long(cls, context_len: int, chars: int, param: str = "messages") -> "ContextLengthExceeded":
        """The prompt's text (in ``param``) is longer than any ``context_len`` tokens can spell (a size
        bound, no tokenizer involved)."""
        return cls(f"This model's maximum context length is {context_len} tokens, but the {param} hold "
                   f"{chars} characters, more than any {context_len} tokens can spell.", param=param)


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


class Retryable(ServingError):
    """An answer the client should retry later: it carries ``Retry-After`` (``retry_after_s`` seconds,
    the class's default unless the caller gives one)."""

    retry_after_s: int = 1

    def __init__(self, message: str, *, retry_after_s: int | None = None, **kwargs: Any) -> None:
        seconds = self.retry_after_s if retry_after_s is None else retry_after_s
        super().__init__(message, headers=kwargs.pop("headers", None) or {"Retry-After": str(seconds)},
                         **kwargs)


class Overloaded(Retryable):
    """A model's queue is full; the client should retry after ``retry_after_s`` seconds (503)."""

    status_code = 503
    error_type = "server_overloaded"
    default_code = "overloaded"


class ReplicaUnavailable(Retryable):
    """The model replica handling the request died or cannot be reached (503, always: not a rate limit)."""

    status_code = 503
    error_type = "server_error"
    default_code = "replica_unavailable"


class ModelUnavailable(Retryable):
    """The model's deployment has no running replica (starting, failed to load, unhealthy); the message
    names the reason when Ray reports one (503 with Retry-After)."""

    status_code = 503
    error_type = "server_error"
    default_code = "model_unavailable"


class ModelLoadFailed(ServingError):
    """An on-demand model could not be loaded (500, ``model_load_failed``); the next request for it tries
    again. The message names the model and the cause, never a traceback."""

    status_code = 500
    error_type = "server_error"
    default_code = "model_load_failed"


class ModelLoading(Retryable):
    """A request waited longer than the load timeout for its on-demand model (503 with Retry-After); the
    load goes on, so a retry may find the model loaded."""

    status_code = 503
    error_type = "server_error"
    default_code = "model_loading"
    retry_after_s = 5


class NotReady(Retryable):
    """``/health`` while some model is not ready (503). The OpenAI error body carries one more member,
    ``models``: the readiness of every model (the same map a 200 answer carries)."""

    status_code = 503
    error_type = "server_error"
    default_code = "not_ready"

    def __init__(self, message: str, models: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.models = models

    def __reduce__(self):
        return (NotReady, (self.message, self.models))

    def body(self) -> dict[str, Any]:
        return {**super().body(), "models": self.models}


class ClientDisconnected(ServingError):
    """The client hung up before the server had read its request (499, nginx's "client closed request").

    The client's doing, not a fault: logged in one INFO line, never as a server error. Nobody reads the
    answer; it exists so that the access log says 499."""

    status_code = 499
    error_type = "invalid_request_error"
    default_code = "client_disconnected"


class BodyTimedOut(ServingError):
    """The client did not send its whole request body within ``ingress.body_timeout_s`` (408)."""

    status_code = 408
    default_code = "request_body_timeout"


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
    backpressure and dead replicas with its own types, and Starlette reports a client that hung up
    mid-body with ``ClientDisconnect``; this is the one place that knows them.
    """
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc
    from starlette.requests import ClientDisconnect

    cause = getattr(exc, "cause", None)
    if isinstance(cause, ServingError):
        return cause
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, ClientDisconnect):
        return ClientDisconnected("The client closed the connection before the server had read its request.")
    if isinstance(exc, serve_exc.DeploymentUnavailableError):  # Ray gave up starting its replicas
        return ModelUnavailable(f"{exc.message} Retry later; /health names the reason.")
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
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    logger = logging.getLogger("app.errors")
    by_status = {413: RequestTooLarge}

    def answer(request, err: ServingError):
        return render(err, getattr(request.app.state, "settings", None))

    async def on_serving_error(request, exc: ServingError):
        log_error(logger, request, exc, exc.__cause__ or exc)
        return answer(request, for_client(exc))

    async def on_validation_error(request, exc: RequestValidationError):
        return answer(request, validation_error(exc.errors()))

    async def on_http_error(request, exc: HTTPException):
        routing = _ROUTING_ERRORS.get(exc.status_code)
        if routing is not None:
            return answer(request, routing(request, exc))
        cls = by_status.get(exc.status_code, InvalidRequest if exc.status_code < 500 else InternalError)
        err = cls(str(exc.detail) if exc.detail else "error", headers=exc.headers)
        err.status_code = exc.status_code
        return answer(request, err)

    async def on_unexpected(request, exc: Exception):
        err = as_serving_error(exc)
        log_error(logger, request, err, exc)
        return answer(request, for_client(err))

    app.add_exception_handler(ServingError, on_serving_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    # Its own entry, not the catch-all's: Starlette re-raises whatever the catch-all (Exception) handles
    # after answering, and Ray Serve then logs it as a failed request with its traceback.
    app.add_exception_handler(ClientDisconnect, on_unexpected)
    app.add_exception_handler(Exception, on_unexpected)


# Routes of OpenAI's API that this server does not have, with what a client should do instead.
def routes_of(app) -> list[str]:
    """``"METHOD /path"`` of every documented route of the FastAPI ``app``, from its OpenAPI schema
    (which also sees routes that routers and Ray Serve's class-based views nest)."""
    paths = app.openapi().get("paths", {})
    return [f"{method.upper()} {path}" for path, operations in paths.items() for method in operations]


def unknown_route(request, exc) -> NotFound:
    """The 404 of a path no route matches: says which request missed and which routes exist."""
    method, path = request.method, request.url.path
    return NotFound(f"Invalid URL ({method} {path}): this server has no such route. "
                    f"Routes: {', '.join(routes_of(request.app))}.",
                    code="unknown_route")


def wrong_method(request, exc) -> MethodNotAllowed:
    """The 405 of a known path asked with another method; keeps the ``Allow`` header HTTP requires."""
    allow = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow", "")
    return MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}; allowed: "
                            f"{allow}.", headers={"Allow": allow})


_ROUTING_ERRORS = {404: unknown_route, 405: wrong_method}


def log_error(logger, request, err: ServingError, cause: BaseException) -> None:
    """Log an error answer: a server fault (500) at ERROR with the traceback of ``cause``; anything the
    client can act on or caused (4xx, a hang-up's 499 included) at INFO, and overload/timeouts (other
    5xx) at WARNING, in one line each."""
    where = (request.method, request.url.path, current_request_id(), err.status_code, err.code, err.message)
    if isinstance(err, InternalError):
        logger.error("unhandled error on %s %s (request id %s): %d %s: %s", *where, exc_info=cause)
    else:
        logger.log(logging.INFO if err.status_code < 500 else logging.WARNING,
                   "%s %s (request id %s) answered %d %s: %s", *where)


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
# Error types of app.protocol.common whose name is the OpenAI error code -> whether the message is
# prefixed with "Invalid value for '<param>'" (the others name their parameter themselves).
_OWN_CODES = {"invalid_unicode": True, "unsupported_parameter": False, "invalid_parameter_combination": False}
# Better words than pydantic's for some error types.
_MESSAGES = {"finite_number": "NaN and Infinity are not allowed; the value must be a finite number",
             "string_unicode": "the text is not valid Unicode (a lone surrogate escape?)"}
# Codes for some of pydantic's error types.
_CODES = {"string_unicode": "invalid_unicode"}


def validation_error(errors: list[dict[str, Any]]) -> InvalidRequest:
    """An InvalidRequest naming the first offending parameter of a pydantic/FastAPI error list.

    An error whose context has ``at`` is reported at that path below its location; one of the
    protocol's own error types keeps its message as written and becomes the ``code``.
    """
    if not errors:
        return InvalidRequest("Invalid request.")
    first = errors[0]
    loc, where = [], tuple(first.get("loc") or ())
    for part in where[1:] if where[:1] == ("body",) else where:
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part.startswith("function-")):
            continue  # pydantic names union branches in the location; they are no parameter names
        loc.append(part)
    if first.get("type") == "json_invalid":
        return InvalidRequest("We could not parse the JSON body of your request: "
                              f"{first.get('ctx', {}).get('error', 'invalid JSON')}.", code="invalid_json")
    param = ""
    for part in loc:
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    param = (param + str((first.get("ctx") or {}).get("at", ""))).lstrip(".")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    msg = _MESSAGES.get(first.get("type"), msg)
    if first.get("type") in _OWN_CODES:
        prefixed = _OWN_CODES[first["type"]] and param
        return InvalidRequest(f"Invalid value for '{param}': {msg}" if prefixed else msg,
                              param=param or None, code=first["type"])
    code = _CODES.get(first.get("type"))
    if not param:
        return InvalidRequest(f"Invalid request body: {msg}", code=code)
    return InvalidRequest(f"Invalid value for '{param}': {msg}", param=param, code=code)
