"""Server settings: every limit the server enforces, in one place (the command line fills them in)."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass
class ServerSettings:
    """Limits and switches of one server; the defaults are safe for a server reachable by others.

    served_model_names: names accepted in a request's ``model`` (the first is the one reported back).
    max_batch_tokens / max_batch_items: budget of one batch formed from the queue (and of each forward).
    max_wait_ms: how long the batcher waits for more requests once it holds one, while others are being prepared.
    max_queue_requests: requests admitted but not yet in a batch; past it, 429 with Retry-After.
    max_items_per_request / max_request_bytes: size limits of one request.
    api_key: with it, every endpoint but /health needs ``Authorization: Bearer <api_key>``.
    admin_token: enables /v1/internal/lora/* for ``Authorization: Bearer <admin_token>``.
    max_loras: custom adapters loaded at once (task adapters do not count).
    allow_image_urls / allow_private_image_urls: fetch http(s) image URLs / also private addresses.
    image_url_timeout_s / image_url_max_bytes: limits of one image download.
    max_image_pixels: decoded images above this are refused (None: the model config's). The server sets the
        model config's ``max_image_pixels`` to it while serving, so that ``encode()`` checks the same limit.
    max_request_pixels / max_request_image_tokens: budget of one request's images, in decoded pixels and in
        image tokens, checked from the image headers before anything is decoded (413 past it).
    decode_workers: threads that decode images, apart from the preprocessing threads, so that text requests
        never wait behind a large image.
    request_read_timeout_s: time allowed to receive a request's body (408 past it): a slow client cannot hold
        a connection and its buffers forever.
    default_multivector: ``return_multivector`` of requests that do not say.
    inflight_batches: batches in ``encode()`` at once (threads of the encode executor). Two by default: while one
        call waits for its vectors, the next one's GPU work is already queued, so the GPU does not idle between
        batches (the model issues one call's GPU work at a time). One: a batch at a time.
    preprocess_workers: threads that read image headers, tokenise and write large responses (with HTTP processes,
        ``frontend.py``, those write the responses). One by default: on a
        full-size model on an H100, two busy tokenising threads slowed the encode thread's batches 2.8x
        (interpreter-lock contention), one by 10%.
    """

    served_model_names: tuple[str, ...] = ("nova-embeddings-v1",)
    max_batch_tokens: int = 16384
    max_batch_items: int = 256
    max_wait_ms: float = 5.0
    max_queue_requests: int = 1024
    max_items_per_request: int = 2048
    max_request_bytes: int = 64 * MIB
    api_key: str | None = None
    admin_token: str | None = None
    max_loras: int = 4
    allow_image_urls: bool = False
    allow_private_image_urls: bool = False
    image_url_timeout_s: float = 10.0
    image_url_max_bytes: int = 20 * MIB
    max_image_pixels: int | None = None
    max_request_pixels: int = 100_000_000
    max_request_image_tokens: int = 65536
    decode_workers: int = 2
    request_read_timeout_s: float = 60.0
    default_multivector: bool = False
    preprocess_workers: int = 1
    inflight_batches: int = 2

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("served_model_names must name at least one model")
        positive = ("max_batch_tokens", "max_batch_items", "max_queue_requests", "max_items_per_request",
                    "max_request_bytes", "image_url_timeout_s", "image_url_max_bytes", "preprocess_workers",
                    "max_request_pixels", "max_request_image_tokens", "decode_workers", "request_read_timeout_s",
                    "inflight_batches")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0 or self.max_loras < 0:
            raise ValueError("max_wait_ms and max_loras must not be negative")
        if self.max_image_pixels is not None and self.max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be positive, got {self.max_image_pixels}")
        if self.allow_private_image_urls and not self.allow_image_urls:
            raise ValueError("allow_private_image_urls needs allow_image_urls")

    @property
    def model_name(self) -> str:
        """The name reported in responses and first in /v1/models."""
        return self.served_model_names[0]
