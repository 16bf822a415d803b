"""Image sources a server accepts, and the guarded download of image URLs.

The processor's own ``load_image`` also opens local paths and fetches any URL: right for a library user,
a file-disclosure and request-forgery hole for a server. So the server turns every ``image`` string into
bytes itself first: a data URI or base64 is decoded; an http(s) URL is fetched only with
``--allow-image-urls``, after its host resolves to public addresses only (unless private ones are
allowed), by connecting to the checked address (no second lookup to rebind), with a timeout, a byte
cap and no redirects. Anything else (a path, ``file://``) is refused.

Image bytes are then opened here too, lazily: the header alone gives the size (for the server's budgets)
before anything is decoded, and only the formats the processor accepts (its ``IMAGE_FORMATS``, passed in by
the server) are tried, so PIL's other decoders (PostScript through Ghostscript, and the rest) are never
reached from a request.

Behind HTTP processes (``--http-processes``), an HTTP process opens (``inline_image_headers``, under the same
format list, per-image limit and per-request pixel budget) and decodes a request's inline images itself and sends
them decoded: the model's process, whose interpreter lock also drives the GPU, then only checks them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from PIL import Image

class ImageSourceError(ValueError):
    """An ``image`` string the server will not use; the message says why (the caller names the item)."""


def is_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


def decode_inline_image(source: str) -> bytes:
    """A data URI or a bare base64 string -> bytes; anything else (a path, another scheme) is refused."""
    if source[:5].lower() == "data:":  # schemes ignore case
        header, comma, payload = source.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ImageSourceError("'image' data URI must be base64-encoded (data:image/...;base64,...)")
        source = payload
    elif "://" in source[:16]:
        raise ImageSourceError("'image' URLs must be http(s); other schemes are refused")
    try:
        return base64.b64decode("".join(source.split()), validate=True)  # line breaks of MIME base64 are allowed
    except (binascii.Error, ValueError):
        raise ImageSourceError("'image' must be a data URI, a base64 string, or (with --allow-image-urls) an http(s) "
                               "URL; local paths are refused") from None


def open_image_header(data: bytes, formats: tuple[str, ...]) -> Image.Image:
    """Open image bytes lazily, trying only PIL's decoders of ``formats``: size and mode are read from the header;
    nothing is decoded yet."""
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as error:
        raise ImageSourceError(f"image is too large: {error}") from None
    except Exception:  # noqa: BLE001 - PIL raises many types for bad headers; all mean "not an image we read"
        raise ImageSourceError(f"unreadable image: not a {', '.join(formats[:-1])} or {formats[-1]} file") from None


def decode_image(image: Image.Image) -> Image.Image:
    """Decode a lazily opened image (its first frame); the processor converts it to RGB afterwards."""
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - corrupt data surfaces as many types (OSError, SyntaxError...)
        raise ImageSourceError(f"unreadable image: {error}") from None
    return image


async def decode_concurrently(executor: Executor, images: dict[int, Image.Image]) -> dict[int, Any]:
    """Each lazily opened image decoded in ``executor`` at once, off the event loop: the image, or the exception
    its decoding raised, by the same keys."""
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(*(loop.run_in_executor(executor, decode_image, image) for image in images.values()),
                                   return_exceptions=True)
    return dict(zip(images, results))


def has_image_strings(raw_items: list[Any]) -> bool:
    """Whether any item of a request has an ``image`` string (inline or URL): requests without one skip the image
    path."""
    return any(isinstance(raw, dict) and isinstance(raw.get("image"), str) for raw in raw_items)


@dataclass(frozen=True)
class ImageRules:
    """What an HTTP process needs to decode inline images ahead of the model's process: the processor's formats,
    the per-image pixel limit and the per-request pixel budget in force there (which checks them all again)."""

    formats: tuple[str, ...]
    max_image_pixels: int
    max_request_pixels: int


def inline_image_headers(raw_items: list[Any], rules: ImageRules) -> dict[int, Image.Image]:
    """A request's inline images (data URIs, base64) opened lazily, by item index, in item order until one is
    unreadable or passes a limit: that one and the rest are left to the model's process, which refuses the request
    with the same error as without HTTP processes. URLs are left to it too (``--allow-image-urls`` fetches them
    there). Nothing is decoded yet (``decode_image``)."""
    opened: dict[int, Image.Image] = {}
    pixels = 0
    for index, raw in enumerate(raw_items):
        source = raw.get("image") if isinstance(raw, dict) else None
        if not isinstance(source, str) or is_url(source):
            continue
        try:
            image = open_image_header(decode_inline_image(source), rules.formats)
        except ImageSourceError:
            break
        width, height = image.size
        pixels += width * height
        if width * height > rules.max_image_pixels or pixels > rules.max_request_pixels:
            break
        opened[index] = image
    return opened


def is_public_address(address: str) -> bool:
    """Only global unicast: no private, loopback, link-local, multicast, reserved or unspecified address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local)


class ImageFetcher:
    """Downloads image URLs under the server's rules (see the module docstring)."""

    def __init__(self, timeout_s: float, max_bytes: int, allow_private: bool, client: httpx.AsyncClient | None = None):
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.allow_private = allow_private
        self._client = client or httpx.AsyncClient(follow_redirects=False, timeout=timeout_s, trust_env=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> bytes:
        """The body of ``url`` (at most ``max_bytes``), within ``timeout_s`` in all (lookup included)."""
        try:
            return await asyncio.wait_for(self._fetch(url), self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise ImageSourceError(f"image URL timed out after {self.timeout_s:g} s") from None

    async def _fetch(self, url: str) -> bytes:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ImageSourceError("image URL must be http(s)://host/...")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise ImageSourceError("image URL has an invalid port") from None
        address = await self._checked_address(parts.hostname, port)
        host_in_url = f"[{address}]" if ":" in address else address
        direct = urlunsplit((parts.scheme, f"{host_in_url}:{port}", parts.path or "/", parts.query, ""))
        headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
        extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
        try:
            async with self._client.stream("GET", direct, headers=headers, extensions=extensions) as response:
                if response.status_code != 200:
                    raise ImageSourceError(
                        f"image URL answered HTTP {response.status_code} (redirects are not followed)")
                return await self._read_capped(response)
        except httpx.HTTPError as error:
            raise ImageSourceError(f"could not fetch image URL: {type(error).__name__}: {error}") from None

    async def _checked_address(self, host: str, port: int) -> str:
        """Resolve ``host``; every address must be public (unless allowed): one bad address refuses the URL."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise ImageSourceError(f"image URL host {host!r} does not resolve: {error}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not addresses:
            raise ImageSourceError(f"image URL host {host!r} does not resolve")
        if not self.allow_private:
            blocked = [a for a in addresses if not is_public_address(a)]
            if blocked:
                raise ImageSourceError(f"image URL host {host!r} resolves to a private, loopback or link-local "
                                       f"address ({blocked[0]}); refused")
        return addresses[0]

    async def _read_capped(self, response: httpx.Response) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageSourceError(f"image URL body is {declared} bytes, over the limit of {self.max_bytes}")
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise ImageSourceError(f"image URL body is over the limit of {self.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
