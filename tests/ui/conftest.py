"""Fixtures for the browser tests: a real `petvit serve` on a free loopback port, and headless Debian Chromium.

Both are module-scoped: starting the service (torch import, model load, warm-up) and the browser are the slow
parts, and every test loads the page afresh anyway.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "run `bash scripts/install-browser.sh` (as root: installs Debian's chromium and chromium-driver)"
READY_TIMEOUT_S = 90  # torch import + model load + warm-up on a busy 2-core CI box


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def petvit_command() -> list[str]:
    """The installed `petvit` console script next to this interpreter (what README tells people to run)."""
    script = Path(sys.executable).parent / "petvit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cli"]


@contextlib.contextmanager
def petvit_serve(artifact: Path, log_path: Path, **env_overrides: str) -> Iterator[str]:
    """`petvit serve` on `artifact` (with extra PETVIT_* variables); yields its base URL once /readyz answers 200."""
    port = free_port()
    env = {**os.environ, "PETVIT_CHECKPOINT": str(artifact), "PETVIT_DEVICE": "cpu", **env_overrides}
    env.pop("PETVIT_API_KEY", None)  # the page is tested without a key
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*petvit_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`petvit serve` exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`petvit serve` not ready after {READY_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def service_url(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`petvit serve` on the tiny artifact; yields its base URL once /readyz answers 200."""
    with petvit_serve(tiny_artifact, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def open_set_service_url(open_set_digits, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`petvit serve` on the digits 0-4 artifact, which has an open set (tests/conftest.py open_set_digits)."""
    with petvit_serve(open_set_digits.artifact, tmp_path_factory.mktemp("serve") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Headless Debian Chromium through chromedriver. Missing browser = failure, never a skip."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not (p.exists() and os.access(p, os.X_OK))]
    if missing:
        pytest.fail(f"browser test needs {' and '.join(missing)}: {INSTALL_HINT}", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:  # pragma: no cover - selenium is a dev dependency
        pytest.fail(f"selenium is not installed ({err}): pip install -e '.[dev]'", pytrace=False)

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # The closed network here: without the background-networking flags Chromium keeps dialling Google's hosts.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--force-device-scale-factor=1",
        "--window-size=1280,1000",
        "--lang=en-US",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(driver_log))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def upload_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Files the tests pick in the browser: the chelsea photo as a JPEG and as a TIFF (which Chromium cannot
    display), a text file, a name full of markup."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("uploads")
    chelsea = folder / "chelsea.jpg"
    Image.fromarray(np.asarray(data.chelsea())).save(chelsea, format="JPEG", quality=90)
    tiff = folder / "chelsea.tif"
    Image.fromarray(np.asarray(data.chelsea())).save(tiff, format="TIFF")
    text = folder / "notes.txt"
    text.write_text("these are notes, not a photo\n")
    # A file name that would run script if the page put it (or a server message echoing it) into innerHTML.
    markup = folder / "<img src=x onerror=window.__pwned=1>.jpg"
    shutil.copy(chelsea, markup)
    return {"chelsea": chelsea, "tiff": tiff, "text": text, "markup": markup}
