"""app/routes/ui.py inside the real app, without a browser or a model: what is served, with which headers."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
import tomllib
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.routes.ui import ASSETS, STATIC_DIR


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    # No `with`: the lifespan (model loading) does not run; the page needs no model to be served.
    missing = tmp_path_factory.mktemp("none") / "absent.safetensors"
    return TestClient(create_app(Settings(checkpoint=missing)))


def test_root_serves_the_page_with_a_same_origin_only_csp(client: TestClient):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.text == (STATIC_DIR / "index.html").read_text()
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp


@pytest.mark.parametrize(("name", "media_type"), sorted(ASSETS.items()))
def test_each_asset_is_served_with_its_type(client: TestClient, name: str, media_type: str):
    response = client.get(f"/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == (STATIC_DIR / name).read_bytes()


def test_page_references_only_served_assets_and_no_other_host(client: TestClient):
    html = client.get("/").text
    referenced = set(re.findall(r'(?:href|src)="static/([^"]+)"', html))
    assert referenced == set(ASSETS)
    # Offline: nothing loaded from another origin (no CDN, no web fonts).
    for text in (html, *(client.get(f"/static/{n}").text for n in ASSETS)):
        assert not re.search(r"(?:src|href)=\"(?:https?:)?//|url\((?:https?:)?//|@import|fetch\(\"http", text)


@pytest.mark.parametrize("name", ["index.html", "nope.js", "..%2Fmain.py", "%2E%2E%2F__init__.py"])
def test_anything_else_under_static_is_a_json_404(client: TestClient, name: str):
    response = client.get(f"/static/{name}")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"code", "message"}


def test_the_page_is_not_in_the_api_schema(client: TestClient):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths
    assert not any(p.startswith("/static") for p in paths)


def test_static_files_ship_with_the_package():
    """The wheel (and so the Docker image, which installs it) carries every file under app/static/."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["app"]
    shipped = {p.name for p in STATIC_DIR.iterdir() if p.is_file()}
    assert shipped >= {"index.html", *ASSETS}
    for name in shipped:
        assert any(fnmatch.fnmatch(f"static/{name}", pattern) for pattern in patterns), f"static/{name} not packaged"
