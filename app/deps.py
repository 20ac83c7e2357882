"""Dependencies handlers declare as `Annotated[...]` aliases: `def classify(service: ServiceDep, ...)`."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from app.config import Settings
from app.errors import unauthorized
from app.service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


def require_api_key(
    service: Annotated[Service, Depends(get_service)],
    x_api_key: Annotated[str | None, Header(description="needed when the service has PETVIT_API_KEY set")] = None,
) -> None:
    if not api_key_matches(service.settings, x_api_key):
        service.metrics.rejected.labels("unauthorized").inc()
        raise unauthorized()


def api_key_matches(settings: Settings, given: str | None) -> bool:
    """True when no key is configured or `given` is it."""
    expected = settings.api_key
    if expected is None:
        return True
    # compare_digest: the time taken must not reveal how much of the key was right
    return given is not None and hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


ServiceDep = Annotated[Service, Depends(get_service)]
ApiKeyDep = Depends(require_api_key)
