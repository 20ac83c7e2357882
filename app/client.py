"""Python clients for the petvit service (httpx): PetvitClient (sync) and AsyncPetvitClient.

with PetvitClient("http://localhost:8000") as client:
    answer = client.classify(["cat.jpg"], top_k=3)
    print(answer["results"][0]["predictions"][0]["label"])
"""

from __future__ import annotations

import mimetypes
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

ImageInput = str | os.PathLike | bytes


class PetvitError(Exception):
    """The service answered with an error: status, code and message from its JSON body."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def _files(images: Sequence[ImageInput]) -> list[tuple[str, tuple[str, bytes, str]]]:
    files = []
    for i, image in enumerate(images):
        if isinstance(image, bytes):
            files.append(("file", (f"image{i}", image, "application/octet-stream")))
        else:
            path = Path(image)
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            files.append(("file", (path.name, path.read_bytes(), ctype)))
    return files


def _params(top_k: int | None, heatmap: bool, heatmap_method: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"heatmap": "true" if heatmap else "false"}
    if top_k is not None:
        params["top_k"] = top_k
    if heatmap_method is not None:
        params["heatmap_method"] = heatmap_method
    return params


def _answer(response: httpx.Response) -> dict[str, Any]:
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
        code, message = error["code"], error["message"]
    except (ValueError, KeyError, TypeError):
        code, message = f"http_{response.status_code}", response.text[:200]
    retry = response.headers.get("Retry-After")
    raise PetvitError(response.status_code, code, message, float(retry) if retry else None)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


def wait_until_ready(
    url: str, timeout: float = 60, interval: float = 0.2, still_running: Callable[[], bool] = lambda: True
) -> bool:
    """Poll GET {url}/readyz until it answers 200: True then; False once `timeout` seconds pass or `still_running()`
    says the server died (for callers that started it as a subprocess or thread)."""
    deadline = time.monotonic() + timeout
    while still_running():
        try:
            if httpx.get(f"{url}/readyz", timeout=min(2.0, max(interval, 0.5))).status_code == 200:
                return True
        except httpx.TransportError:
            pass  # not listening yet
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return False


class PetvitClient:
    def __init__(self, url: str = "http://localhost:8000", api_key: str | None = None, timeout: float = 60) -> None:
        self._http = httpx.Client(base_url=url, headers=_headers(api_key), timeout=timeout)

    def classify(
        self,
        images: Sequence[ImageInput],
        top_k: int | None = None,
        heatmap: bool = False,
        heatmap_method: str | None = None,
    ) -> dict:
        params = _params(top_k, heatmap, heatmap_method)
        return _answer(self._http.post("/classify", files=_files(images), params=params))

    def model(self) -> dict:
        return _answer(self._http.get("/v1/model"))

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PetvitClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPetvitClient:
    def __init__(
        self,
        url: str = "http://localhost:8000",
        api_key: str | None = None,
        timeout: float = 60,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout, transport=transport)

    async def classify(
        self,
        images: Sequence[ImageInput],
        top_k: int | None = None,
        heatmap: bool = False,
        heatmap_method: str | None = None,
    ) -> dict:
        params = _params(top_k, heatmap, heatmap_method)
        return _answer(await self._http.post("/classify", files=_files(images), params=params))

    async def model(self) -> dict:
        return _answer(await self._http.get("/v1/model"))

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).status_code == 200

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncPetvitClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
