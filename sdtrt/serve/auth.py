"""API-key check as ASGI middleware: with a key set, every path except /health needs
`Authorization: Bearer KEY` (or HTTP Basic with the key as the password, which is how A1111 clients
send credentials). Compared in constant time; unknown paths are refused before routing, so an
unauthenticated client learns nothing about the API."""

from __future__ import annotations

import base64
import binascii
import hmac
import json

OPEN_PATHS = frozenset({"/health"})


def authorized(header: bytes | None, key: bytes) -> bool:
    if not header:
        return False
    scheme, _, credentials = header.partition(b" ")
    scheme = scheme.lower()
    if scheme == b"bearer":
        return hmac.compare_digest(credentials.strip(), key)
    if scheme == b"basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(decoded.partition(b":")[2], key)
    return False


class ApiKey:
    def __init__(self, app, key: str | None, on_refused=lambda: None):
        self.app, self.key, self.on_refused = app, key.encode() if key else None, on_refused

    async def __call__(self, scope, receive, send):
        if self.key is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization")
        if authorized(header, self.key):
            return await self.app(scope, receive, send)
        self.on_refused()
        body = json.dumps({"error": "unauthorized", "detail": "this server needs an API key.",
                           "fix": "send the header Authorization: Bearer <key>"}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="sdtrt"')]})
        await send({"type": "http.response.body", "body": body})
