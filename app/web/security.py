"""Webhook authentication (shared token or HMAC signature), body size limit and client identity."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import HTTPException, Request, status

TOKEN_HEADER = "X-Webhook-Token"  # noqa: S105 - a header name, not a secret
SIGNATURE_HEADER = "X-Hub-Signature"
_SIGNATURE_PREFIX = "sha256="
# Headers by which a proxy or tunnel says it relayed a request: ngrok adds X-Forwarded-For, cloudflared
# CF-Connecting-IP. Behind either, every internet caller connects from 127.0.0.1.
FORWARDING_HEADERS = (
    "X-Forwarded-For",
    "Forwarded",
    "CF-Connecting-IP",
    "X-Real-IP",
    "True-Client-IP",
    "X-Forwarded-Host",
)


def token_matches(presented: str, secret: str) -> bool:
    """Compare a presented shared token with the secret in constant time."""
    return hmac.compare_digest(presented.encode(), secret.encode())


def signature_matches(body: bytes, presented: str, secret: str) -> bool:
    """Check `sha256=<hex>` against the HMAC-SHA256 of the raw body, in constant time."""
    if not presented.startswith(_SIGNATURE_PREFIX):
        return False
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    digest = presented[len(_SIGNATURE_PREFIX) :].strip().lower()
    return hmac.compare_digest(digest.encode(), expected.encode())


def unauthorized(reason: str) -> HTTPException:
    """A 401 with a reason that reveals nothing about the secret."""
    return HTTPException(status.HTTP_401_UNAUTHORIZED, reason)


def too_large(limit: int) -> HTTPException:
    """A 413 naming the limit."""
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body larger than {limit} bytes")


def declared_length_fits(request: Request, limit: int) -> None:
    """Refuse at once a body whose Content-Length already says it is too large (or is not a number)."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.strip().isdigit():
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Content-Length is not a number")
    if int(declared) > limit:
        raise too_large(limit)


async def read_body(request: Request, limit: int) -> bytes:
    """Read the body chunk by chunk and stop past `limit`, whatever Content-Length claimed."""
    declared_length_fits(request, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def client_ip(request: Request, trust_proxy_headers: bool) -> str:
    """The caller's address; proxy headers count only when the service is known to sit behind one."""
    if trust_proxy_headers:
        cloudflare = request.headers.get("cf-connecting-ip", "").strip()
        if cloudflare:
            return cloudflare
        forwarded = request.headers.get("x-forwarded-for", "").split(",")[0].strip()
        if forwarded:
            return forwarded
    return request.client.host if request.client else "unknown"


def forwarding_header(request: Request) -> str | None:
    """The first header that says a proxy or tunnel relayed the request, or None for a direct caller."""
    return next((name for name in FORWARDING_HEADERS if name in request.headers), None)
