"""The page says plainly when no pet was recognised (the result's `unknown` is true) and still shows the guesses,
dimmed; a recognised image looks as before. Real headless Chromium against `petvit serve` on the digits 0-4 artifact
(tests/conftest.py open_set_digits), with an unseen digit (a 7 or so: none of its classes) and a held-out 0-4."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import OpenSetDigits

WAIT_S = 30


def clearest(d: OpenSetDigits, unseen: bool) -> torch.Tensor:
    """The image whose open-set score is furthest on its side of the threshold (unknown or recognised)."""
    outputs, images = (d.unseen, d.unseen_images) if unseen else (d.test, d.test_images)
    temperature = d.fields["calibration"].temperature
    scores = d.fields["open_set"].deciding_score(outputs.logits / temperature, outputs.features)
    return images[int(scores.argmax() if unseen else scores.argmin())]


@pytest.fixture(scope="module")
def digit_files(open_set_digits: OpenSetDigits, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("digits")
    files = {}
    for name, unseen in (("unseen", True), ("known", False)):
        files[name] = folder / f"{name}.png"
        Image.fromarray(clearest(open_set_digits, unseen).permute(1, 2, 0).numpy()).save(files[name])
    return files


def classify(page: WebDriver, url: str, path: Path):
    page.get(f"{url}/")
    WebDriverWait(page, WAIT_S).until(lambda d: d.find_elements(By.ID, "model-trained"))
    page.find_element(By.ID, "file-input").send_keys(str(path))
    done = (By.CSS_SELECTOR, "#results > li.result.is-done")
    return WebDriverWait(page, WAIT_S).until(lambda d: d.find_elements(*done))[0]


def api_result(url: str, path: Path) -> dict:
    with path.open("rb") as f:
        response = httpx.post(f"{url}/classify", files={"file": (path.name, f, "image/png")}, timeout=WAIT_S)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def opacity(page: WebDriver, element) -> float:
    return float(page.execute_script("return getComputedStyle(arguments[0]).opacity", element))


def test_no_pet_recognised_is_said_plainly_with_the_guesses_dimmed(
    browser: WebDriver, open_set_service_url: str, digit_files: dict[str, Path]
) -> None:
    assert api_result(open_set_service_url, digit_files["unseen"])["unknown"] is True
    card = classify(browser, open_set_service_url, digit_files["unseen"])
    notice = card.find_element(By.CLASS_NAME, "unknown-notice")
    assert notice.is_displayed() and notice.text.startswith("No pet recognised.")
    predictions = card.find_element(By.CLASS_NAME, "predictions")
    rows = predictions.find_elements(By.CSS_SELECTOR, "li")
    assert len(rows) == 5 and all(row.is_displayed() for row in rows)  # the guesses are still there
    assert opacity(browser, predictions) < 0.7  # dimmed
    assert predictions.get_attribute("aria-label").startswith("Dimmed guesses")
    assert card.get_attribute("data-unknown") == "true"


def test_a_recognised_image_shows_no_notice_and_full_guesses(
    browser: WebDriver, open_set_service_url: str, digit_files: dict[str, Path]
) -> None:
    assert api_result(open_set_service_url, digit_files["known"])["unknown"] is False
    card = classify(browser, open_set_service_url, digit_files["known"])
    assert not card.find_element(By.CLASS_NAME, "unknown-notice").is_displayed()
    assert opacity(browser, card.find_element(By.CLASS_NAME, "predictions")) == 1.0
    assert card.get_attribute("data-unknown") == "false"
