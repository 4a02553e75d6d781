"""The ingress's side of image input: every ``image_url`` part of a request is made ready to travel.

:func:`resolve_images` runs before a request is sent to its model replica (``GenerationServing.screen``).
For each image part, by the form of its URL:

* ``data:image/...;base64,...``: the decoded size, bounded from the payload's length (no decoding: the
  replica decodes), must be at most ``max_bytes``;
* ``http(s)://``: fetched, when ``allow_remote`` and the host is allowed (``allowed_hosts``, checked on
  every redirect hop too), within ``fetch_timeout_s`` for the whole fetch, reading at most
  ``max_bytes``; the answer must be a 2xx ``image/*``;
* ``file://``: read, when ``file_root`` is set and the file's real path (symlinks resolved) lies under
  the root's, off the event loop; it must be a regular file of at most ``max_bytes``.

Fetched and read bytes are stored on the part (``ImageURL.set_data``); the replica decodes them. Every
refusal is an :class:`~app.errors.InvalidRequest` (400) naming the part (``messages[i].content[j]``) with
one of the codes below; nothing here answers a 5xx. Images are not decoded here (no Pillow on the
ingress). Policy refusals (remote disabled, host or path not allowed, data URL too large) come before
any fetch; the fetches and reads of one request then run concurrently, the first failure cancelling the
rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl
import stat
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from app.config import ImageFetchSpec
from app.errors import InvalidRequest

# Error codes (the ``code`` of the 400 answers).
INVALID_URL = "invalid_image_url"        # malformed, or a redirect to something not http(s)
NOT_ALLOWED = "image_url_not_allowed"    # the policy refuses the URL (remote off, host, path, file root)
TOO_LARGE = "image_too_large"            # more than max_bytes
FETCH_FAILED = "image_fetch_failed"      # connection error, non-2xx, not an image, too many redirects
FETCH_TIMEOUT = "image_fetch_timeout"    # past fetch_timeout_s

REDIRECTS = frozenset({301, 302, 303, 307, 308})
# identity: a compressed body would be expanded past the byte cap before the cap could see it.
FETCH_HEADERS = {"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "serve-transformers-images"}

logger = logging.getLogger(__name__)


async def resolve_images(request: Any, policy: ImageFetchSpec) -> None:
    """Check every image part of ``request`` (anything with ``images()`` -> ``[(where, ImageURL)]``; a
    request without it has none) against ``policy``, and fetch or read its web and file URLs into the
    part's ``data``. Raises InvalidRequest naming the first offending part; returns once all are ready.
    A URL named by several parts is fetched once."""
    images = getattr(request, "images", None)
    parts = images() if callable(images) else []
    web: dict[str, list[tuple[str, Any]]] = {}
    files: dict[str, list[tuple[str, Any]]] = {}
    for where, image in parts:
        url = image.url
        head = url[:8].lower()
        if head.startswith("data:"):
            check_data_url(where, url, policy)
        elif head.startswith(("http://", "https://")):
            check_web_url(where, url, policy)
            web.setdefault(url, []).append((where, image))
        elif head.startswith("file://"):
            file_path(where, url, policy)
            files.setdefault(url, []).append((where, image))
        else:  # the protocol's validator lets no other form through
            raise InvalidRequest(f"The image URL at '{where}' is neither a data:, http(s):// nor file:// URL.",
                                 param=where, code=INVALID_URL)
    if not web and not files:
        return
    order = {where: n for n, (where, _) in enumerate(parts)}
    try:
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(await _client_for(policy)) if web else None
            async with asyncio.TaskGroup() as group:
                for url, users in web.items():
                    group.create_task(_ready(users, fetch(client, users[0][0], url, policy)))
                for url, users in files.items():
                    group.create_task(_ready(users, read_file(users[0][0], url, policy)))
    except BaseExceptionGroup as failed:  # only InvalidRequest: fetch and read_file raise nothing else
        first = min(failed.exceptions, key=lambda e: order.get(getattr(e, "param", None), len(order)))
        raise first from None


async def _ready(users: list[tuple[str, Any]], load) -> None:
    data = await load
    for _, image in users:
        image.set_data(data)


# --- data: URLs ---------------------------------------------------------------------------------------

def check_data_url(where: str, url: str, policy: ImageFetchSpec) -> None:
    """A base64 data URL's decoded size (3 bytes per 4 characters, less the padding) must be at most
    ``max_bytes``: a bound read off the length, so a large payload costs no decoding on the loop."""
    comma = url.find(",")
    if comma < 0 or ";base64" not in url[:comma].lower():
        raise InvalidRequest(f"The image at '{where}' is a data URL but not a base64 one "
                             "(data:image/<type>;base64,<data>).", param=where, code=INVALID_URL)
    chars = len(url) - comma - 1
    size = chars * 3 // 4 - (url.endswith("==") + url.endswith("="))
    if size > policy.max_bytes:
        raise InvalidRequest(f"The image at '{where}' is a data URL of about {size} bytes; the largest image "
                             f"taken is {policy.max_bytes} bytes.", param=where, code=TOO_LARGE)


# --- http(s):// URLs ----------------------------------------------------------------------------------

def host_allowed(host: str, allowed: list[str]) -> bool:
    """Whether ``host`` is allowed: any host when ``allowed`` is empty, else one equal to an entry, or a
    subdomain of an entry ``*.suffix`` (not ``suffix`` itself). Case and a trailing dot do not count."""
    if not allowed:
        return True
    host = host.lower().rstrip(".").strip("[]")
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".").strip("[]")
        if pattern.startswith("*.") and host.endswith(pattern[1:]) or host == pattern:
            return True
    return False


def _parsed(where: str, url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise InvalidRequest(f"The image URL at '{where}' is not a valid URL: {exc}.", param=where,
                             code=INVALID_URL) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise InvalidRequest(f"The image URL at '{where}' must be an http(s):// URL with a host.", param=where,
                             code=INVALID_URL)
    return parsed


def check_web_url(where: str, url: str, policy: ImageFetchSpec, redirected: bool = False) -> httpx.URL:
    """The parsed URL, if the policy lets it be fetched (``redirected``: reached by a redirect)."""
    parsed = _parsed(where, url)
    if not policy.allow_remote:
        raise InvalidRequest(f"The image at '{where}' is an http(s) URL, and this server does not fetch "
                             "images from the web; send it as a data:image/...;base64, URL.", param=where,
                             code=NOT_ALLOWED)
    if not host_allowed(parsed.host, policy.allowed_hosts):
        via = " (the address a redirect led to)" if redirected else ""
        raise InvalidRequest(f"The image at '{where}' is on host '{parsed.host}'{via}, which this server does "
                             "not fetch images from.", param=where, code=NOT_ALLOWED)
    return parsed


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context()  # reads the CA bundle: made once, on a worker thread


async def _client_for(policy: ImageFetchSpec) -> httpx.AsyncClient:
    """A client for the fetches of one request (redirects are followed by :func:`_follow`, checked)."""
    return httpx.AsyncClient(verify=await asyncio.to_thread(_ssl_context), follow_redirects=False,
                             timeout=policy.fetch_timeout_s, headers=FETCH_HEADERS)


async def fetch(client: httpx.AsyncClient, where: str, url: str, policy: ImageFetchSpec) -> bytes:
    """The image at ``url`` (already checked by :func:`check_web_url`), redirects followed and checked,
    the whole fetch within ``fetch_timeout_s``. Raises InvalidRequest only."""
    host = httpx.URL(url).host
    try:
        async with asyncio.timeout(policy.fetch_timeout_s):
            return await _follow(client, where, url, policy)
    except (TimeoutError, httpx.TimeoutException):
        raise InvalidRequest(f"Could not fetch the image at '{where}': {host} did not send it within "
                             f"{policy.fetch_timeout_s:g} s.", param=where, code=FETCH_TIMEOUT) from None
    except InvalidRequest:
        raise
    except httpx.HTTPError as exc:  # connection refused, DNS, TLS, a broken answer
        reason = str(exc) or type(exc).__name__
        raise InvalidRequest(f"Could not fetch the image at '{where}' from {host}: {reason}.", param=where,
                             code=FETCH_FAILED) from None
    except Exception as exc:  # anything else a hostile server can provoke is still the client's 400
        logger.warning("fetching image %s failed unexpectedly", url[:200], exc_info=exc)
        raise InvalidRequest(f"Could not fetch the image at '{where}' from {host}.", param=where,
                             code=FETCH_FAILED) from None


async def _follow(client: httpx.AsyncClient, where: str, url: str, policy: ImageFetchSpec) -> bytes:
    target = httpx.URL(url)
    for _ in range(policy.max_redirects + 1):
        async with client.stream("GET", target) as response:
            location = response.headers.get("location")
            if response.status_code in REDIRECTS and location:
                try:
                    following = str(target.join(location))
                except (httpx.InvalidURL, ValueError) as exc:
                    raise InvalidRequest(f"Could not fetch the image at '{where}': it redirects to an invalid "
                                         f"URL ({exc}).", param=where, code=INVALID_URL) from None
                target = check_web_url(where, following, policy, redirected=True)
                continue
            return await _body(response, where, policy)
    raise InvalidRequest(f"Could not fetch the image at '{where}': more than {policy.max_redirects} redirects.",
                         param=where, code=FETCH_FAILED)


async def _body(response: httpx.Response, where: str, policy: ImageFetchSpec) -> bytes:
    """The body of a final answer: a 2xx, uncompressed ``image/*`` of at most ``max_bytes``, read in
    chunks and dropped as soon as it is longer."""
    if not 200 <= response.status_code < 300:
        status = f"{response.status_code} {response.reason_phrase}".strip()
        raise InvalidRequest(f"Could not fetch the image at '{where}': the server answered {status}.",
                             param=where, code=FETCH_FAILED)
    media = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if not media.startswith("image/"):
        got = f"'{media[:80]}'" if media else "no Content-Type"
        raise InvalidRequest(f"The URL at '{where}' is not an image: the server sent {got}, not image/*.",
                             param=where, code=FETCH_FAILED)
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise InvalidRequest(f"Could not fetch the image at '{where}': the server sent it compressed "
                             f"(Content-Encoding: {encoding[:40]}), which is not taken.", param=where,
                             code=FETCH_FAILED)
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise _too_large(where, f"{int(declared)} bytes", policy)
    chunks, size = [], 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > policy.max_bytes:
            raise _too_large(where, f"more than {policy.max_bytes} bytes", policy)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(where: str, size: str, policy: ImageFetchSpec) -> InvalidRequest:
    return InvalidRequest(f"The image at '{where}' is {size}; the largest image taken is {policy.max_bytes} "
                          "bytes.", param=where, code=TOO_LARGE)


# --- file:// URLs -------------------------------------------------------------------------------------

def file_path(where: str, url: str, policy: ImageFetchSpec) -> str:
    """The absolute path a file URL names, if file URLs are taken at all (whether it is under the root
    is :func:`read_file`'s to check: that resolves symlinks, which touches the disk)."""
    if policy.file_root is None:
        raise InvalidRequest(f"The image at '{where}' is a file:// URL, and this server reads no image files; "
                             "send it as a data:image/...;base64, URL.", param=where, code=NOT_ALLOWED)
    parts = urlsplit(url)
    path = unquote(parts.path)
    if parts.netloc not in ("", "localhost") or not path.startswith("/") or "\x00" in path:
        raise InvalidRequest(f"The image URL at '{where}' must name an absolute local path "
                             "(file:///path/to/image).", param=where, code=INVALID_URL)
    return path


async def read_file(where: str, url: str, policy: ImageFetchSpec) -> bytes:
    """The file's bytes, read on a worker thread (see :func:`_read`). Raises InvalidRequest only."""
    try:
        return await asyncio.to_thread(_read, where, url, file_path(where, url, policy), policy)
    except OSError as exc:  # _read maps the expected ones; any other is still about the client's file
        raise InvalidRequest(f"The image file at '{where}' cannot be read: {exc.strerror or exc}.", param=where,
                             code=INVALID_URL) from None


def _read(where: str, url: str, path: str, policy: ImageFetchSpec) -> bytes:
    """Read ``path`` if its real path is under the real ``file_root`` and it is a regular file of at most
    ``max_bytes``. Opened without following a final symlink and without blocking (a FIFO), then checked on
    the open file, so a swap after the check cannot redirect the read. Messages never show the root."""
    root = os.path.realpath(policy.file_root)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise InvalidRequest(f"The image file at '{where}' ({url[:200]}) is not in the directory this server "
                             "reads images from.", param=where, code=NOT_ALLOWED)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidRequest(f"The image file at '{where}' ({url[:200]}) does not exist.", param=where,
                             code=INVALID_URL) from None
    except OSError as exc:
        raise InvalidRequest(f"The image file at '{where}' ({url[:200]}) cannot be read: {exc.strerror}.",
                             param=where, code=INVALID_URL) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequest(f"The image file at '{where}' ({url[:200]}) is not a regular file.",
                                 param=where, code=INVALID_URL)
        if info.st_size > policy.max_bytes:
            raise _too_large(where, f"{info.st_size} bytes", policy)
        file = open(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise
    with file:
        try:
            data = file.read(policy.max_bytes + 1)
        except OSError as exc:
            raise InvalidRequest(f"The image file at '{where}' cannot be read: {exc.strerror}.", param=where,
                                 code=INVALID_URL) from None
    if len(data) > policy.max_bytes:  # it grew since fstat
        raise _too_large(where, f"more than {policy.max_bytes} bytes", policy)
    return data


def check_image_count(images: list[tuple[str, Any]], limit: int) -> None:
    """InvalidRequest naming the first image past ``limit`` (a model's ``limits.max_images_per_request``):
    checked by the ingress before it fetches anything, and by the replica."""
    if len(images) > limit:
        where = images[limit][0]
        raise InvalidRequest(f"this model takes at most {limit} images per request "
                             f"(limits.max_images_per_request), got {len(images)}", param=where,
                             code="too_many_images")
