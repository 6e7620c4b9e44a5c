"""HTTP errors with a JSON body: what went wrong, which field, and how to fix it. Nothing a client
sends may produce a 500 with a traceback; every refusal is one of these."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A refusal with its HTTP status. Body: {"error": kind, "detail": message, "field": name, "fix": hint}."""

    def __init__(self, status: int, kind: str, detail: str, *, field: str | None = None, fix: str | None = None,
                 headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status, self.kind, self.detail, self.field, self.fix = status, kind, detail, field, fix
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.kind, "detail": self.detail}
        if self.field is not None:
            out["field"] = self.field
        if self.fix is not None:
            out["fix"] = self.fix
        out.update(self.extra)
        return out


def invalid(field: str, detail: str, fix: str | None = None, **extra: Any) -> ApiError:
    """422: a field outside what this server does (its domain, a configured limit, an unsupported feature)."""
    return ApiError(422, "invalid_request", detail, field=field, fix=fix, **extra)


def over_limit(field: str, value: Any, limit: int, flag: str) -> ApiError:
    return ApiError(422, "limit_exceeded", f"{field}={value} is above this server's limit of {limit} ({flag}).",
                    field=field, fix=f"pass {field} <= {limit}, or start the server with a higher {flag}",
                    limit=flag, max=limit)


def unsupported(field: str, value: Any, what: str, fix: str) -> ApiError:
    """422 for an A1111 field that would change the image in a way sdtrt does not implement."""
    return ApiError(422, "unsupported", f"{field}={value!r}: {what} is not supported by sdtrt.", field=field, fix=fix)


def bad_type(field: str, value: Any, expected: str) -> ApiError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ApiError(422, "invalid_type", f"{field}={shown} is not {expected}.", field=field, fix=f"send {field} as {expected}")
