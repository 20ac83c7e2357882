"""Dependencies handlers declare as `Annotated[...]` aliases: `def classify(service: ServiceDep, ...)`."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from app.errors import unauthorized
from app.lifecycle import ServiceLifecycle


def get_service(request: Request) -> ServiceLifecycle:
    return request.app.state.service


def require_api_key(
    service: Annotated[ServiceLifecycle, Depends(get_service)],
    x_api_key: Annotated[str | None, Header(description="needed when the service has PETVIT_API_KEY set")] = None,
) -> None:
    expected = service.settings.api_key
    if expected is None:
        return
    # compare_digest: the time taken must not reveal how much of the key was right
    if x_api_key is None or not hmac.compare_digest(x_api_key.encode(), expected.get_secret_value().encode()):
        service.metrics.rejected.labels("unauthorized").inc()
        raise unauthorized()


ServiceDep = Annotated[ServiceLifecycle, Depends(get_service)]
ApiKeyDep = Depends(require_api_key)
