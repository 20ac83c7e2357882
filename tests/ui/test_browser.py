"""The page at `/` in real headless Chromium against a real `petvit serve` (tiny artifact).

What the user sees is checked against what the API answers for the same bytes: the page must neither invent nor
drop anything. Needs /usr/bin/chromium and /usr/bin/chromedriver (scripts/install-browser.sh); fails without.
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

WAIT_S = 30  # a result on a loaded 2-core box; normally well under a second


def percent(score: float) -> str:
    """The page's score format: JavaScript `(score * 100).toFixed(1) + "%"`."""
    return f"{score * 100:.1f}%"


def open_page(browser: WebDriver, url: str) -> None:
    browser.get(f"{url}/")
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.ID, "model-trained"))


def pick_files(browser: WebDriver, *paths: Path) -> None:
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in paths))


def wait_for_cards(browser: WebDriver, count: int) -> list[WebElement]:
    """The result cards, once `count` of them have finished (classified or failed)."""

    def finished(driver: WebDriver):
        cards = driver.find_elements(By.CSS_SELECTOR, "#results > li.result")
        done = [c for c in cards if {"is-done", "is-failed"} & set(c.get_attribute("class").split())]
        return cards if len(cards) == count and len(done) == count else False

    return WebDriverWait(browser, WAIT_S).until(finished)


def classify_via_api(url: str, path: Path, content_type: str, **params) -> httpx.Response:
    with path.open("rb") as f:
        return httpx.post(
            f"{url}/classify", params=params, files={"file": (path.name, f, content_type)}, timeout=WAIT_S
        )


def displayed_rows(card: WebElement) -> list[dict]:
    rows = card.find_elements(By.CSS_SELECTOR, ".predictions > li")
    return [
        {
            "label": row.find_element(By.CLASS_NAME, "prediction-label").text,
            "species": row.find_element(By.CLASS_NAME, "prediction-species").text,
            "score": row.find_element(By.CLASS_NAME, "prediction-score").text,
            "raw_score": float(row.get_attribute("data-score")),
        }
        for row in rows
    ]


def rect(browser: WebDriver, element: WebElement) -> dict:
    return browser.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width, h: r.height};", element
    )


def script_errors(browser: WebDriver) -> list[str]:
    """Console errors other than the failed-request lines Chromium logs for every 4xx answer."""
    return [
        entry["message"]
        for entry in browser.get_log("browser")
        if entry["level"] == "SEVERE" and "the server responded with a status of 4" not in entry["message"]
    ]


def save_screenshot(browser: WebDriver, folder: Path, name: str) -> Path:
    """The whole page (beyond the viewport) as PNG into the test's folder; also into $PETVIT_SCREENSHOT_DIR when
    set, which is how docs/screenshot.png is made."""
    size = browser.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size[0], "height": min(size[1], 4000), "scale": 1},
        },
    )
    data = base64.b64decode(shot["data"])
    assert data.startswith(b"\x89PNG"), "Chromium returned no PNG"
    path = folder / name
    path.write_bytes(data)
    if target := os.environ.get("PETVIT_SCREENSHOT_DIR"):
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


@pytest.fixture
def page(browser: WebDriver, service_url: str) -> WebDriver:
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.set_window_size(1280, 1000)
    browser.get_log("browser")  # drop what earlier tests logged
    open_page(browser, service_url)
    return browser


def test_header_shows_model_name_training_state_and_accuracy(page: WebDriver, service_url: str):
    info = httpx.get(f"{service_url}/v1/model", timeout=WAIT_S).json()
    status = page.find_element(By.ID, "model-status").text
    assert info["name"] in status
    assert info["trained"] is False  # the tiny artifact
    assert page.find_element(By.ID, "model-trained").text.startswith("untrained")
    accuracy = page.find_element(By.ID, "model-accuracy").text
    assert percent(info["evaluation"]["top1"]) in accuracy
    assert script_errors(page) == []


def test_photo_shows_k_rows_equal_to_the_api_answer(page: WebDriver, service_url: str, upload_files, tmp_path):
    top_k = page.find_element(By.ID, "top-k")
    top_k.clear()
    top_k.send_keys("7")  # not the default: the page must pass it on
    pick_files(page, upload_files["chelsea"])
    (card,) = wait_for_cards(page, 1)

    # The same request the page makes: with heatmap=true the model runs its explicit-attention path, whose scores
    # can differ from the fused path's in the last float32 bit.
    response = classify_via_api(service_url, upload_files["chelsea"], "image/jpeg", top_k=7, heatmap="true")
    assert response.status_code == 200, response.text
    (entry,) = response.json()["results"]
    expected = [
        {"label": p["label"], "species": p["species"], "score": percent(p["score"]), "raw_score": p["score"]}
        for p in entry["predictions"]
    ]
    shown = displayed_rows(card)
    assert len(shown) == 7
    assert shown == expected
    assert card.find_element(By.CLASS_NAME, "card-title").text == "chelsea.jpg"
    assert not card.find_element(By.CLASS_NAME, "error").is_displayed()
    save_screenshot(page, tmp_path, "result.png")
    assert script_errors(page) == []


def test_an_emptied_breed_count_means_the_default_not_one(page: WebDriver, upload_files):
    top_k = page.find_element(By.ID, "top-k")
    top_k.send_keys(Keys.CONTROL, "a")
    top_k.send_keys(Keys.BACKSPACE)  # the user clears the field and picks a photo
    assert top_k.get_attribute("value") == ""
    pick_files(page, upload_files["chelsea"])
    (card,) = wait_for_cards(page, 1)
    assert len(displayed_rows(card)) == 5  # was 1: Number("") is 0, clamped up to 1
    assert top_k.get_attribute("value") == "5"


def test_heatmap_overlay_covers_the_photo_and_toggles(page: WebDriver, upload_files):
    pick_files(page, upload_files["chelsea"])
    (card,) = wait_for_cards(page, 1)
    photo = card.find_element(By.CLASS_NAME, "photo")
    overlay = card.find_element(By.CLASS_NAME, "heatmap-overlay")
    toggle = card.find_element(By.CLASS_NAME, "heatmap-toggle")
    slider = card.find_element(By.CLASS_NAME, "heatmap-opacity")

    WebDriverWait(page, WAIT_S).until(lambda d: d.execute_script("return arguments[0].complete", overlay))
    # The server's PNG is at the upload's size, and the page lays it exactly over the photo as displayed.
    natural = page.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay)
    assert natural == [451, 300]
    assert toggle.is_selected() and overlay.is_displayed()
    photo_box, overlay_box = rect(page, photo), rect(page, overlay)
    assert photo_box["w"] > 100 and photo_box["h"] > 50
    assert overlay_box == pytest.approx(photo_box, abs=0.5)

    toggle.send_keys(Keys.SPACE)  # keyboard, as a user without a mouse would
    WebDriverWait(page, 5).until(lambda d: not overlay.is_displayed())
    assert not toggle.is_selected()
    assert slider.get_attribute("disabled") is not None
    toggle.send_keys(Keys.SPACE)
    WebDriverWait(page, 5).until(lambda d: overlay.is_displayed())
    assert rect(page, overlay) == pytest.approx(rect(page, photo), abs=0.5)

    def overlay_opacity() -> float:
        return float(page.execute_script("return getComputedStyle(arguments[0]).opacity", overlay))

    before = overlay_opacity()
    slider.send_keys(Keys.ARROW_LEFT, Keys.ARROW_LEFT)
    assert overlay_opacity() == pytest.approx(before - 0.10, abs=1e-6)
    assert card.find_element(By.CLASS_NAME, "heatmap-opacity-value").text == f"{round((before - 0.10) * 100)}%"
    slider.send_keys(Keys.HOME)
    assert overlay_opacity() == 0.0


def overlay_pixels(browser: WebDriver, overlay: WebElement, points: list[tuple[int, int]]) -> list[list[int]]:
    """RGBA of the overlay image itself (as the browser decoded it, at its natural size) at (x, y) points."""
    return browser.execute_script(
        """
        const [img, points] = arguments;
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth;
        canvas.height = img.naturalHeight;
        const context = canvas.getContext('2d');
        context.drawImage(img, 0, 0);
        return points.map(([x, y]) => Array.from(context.getImageData(x, y, 1, 1).data));
        """,
        overlay,
        [list(p) for p in points],
    )


def test_overlay_is_transparent_heat_over_the_crop_and_a_veil_outside(page: WebDriver, upload_files):
    pick_files(page, upload_files["chelsea"])
    (card,) = wait_for_cards(page, 1)
    overlay = card.find_element(By.CLASS_NAME, "heatmap-overlay")
    WebDriverWait(page, WAIT_S).until(lambda d: d.execute_script("return arguments[0].complete", overlay))
    # chelsea is 451x300; the tiny artifact's crop (resize 37, crop 32) spans x 95.8..355.2, y 20.3..279.7.
    veil, *inside = overlay_pixels(page, overlay, [(20, 150), (120, 150), (225, 150), (330, 150), (225, 40)])
    assert veil == [0, 0, 0, 140]  # the photo shows through, darkened: the model never saw it
    for pixel in inside:
        assert 76 <= pixel[3] <= 178  # heat colours, translucent: the photo shows through here too
        assert pixel[:3] != [0, 0, 0]
    # Nothing of the photo is in the overlay: its left strip is one flat colour.
    assert {tuple(p) for p in overlay_pixels(page, overlay, [(x, y) for x in (0, 40, 90) for y in (0, 150, 299)])} == {
        (0, 0, 0, 140)
    }


def test_a_file_the_browser_cannot_show_gets_the_overlay_alone_over_grey(page: WebDriver, upload_files, tmp_path):
    pick_files(page, upload_files["tiff"])
    (card,) = wait_for_cards(page, 1)
    assert "is-done" in card.get_attribute("class")
    missing = (By.CLASS_NAME, "photo-missing")
    WebDriverWait(page, WAIT_S).until(lambda d: "heatmap alone" in card.find_element(*missing).text)
    photo = card.find_element(By.CLASS_NAME, "photo")
    overlay = card.find_element(By.CLASS_NAME, "heatmap-overlay")
    frame = card.find_element(By.CLASS_NAME, "photo-frame")
    WebDriverWait(page, WAIT_S).until(lambda d: d.execute_script("return arguments[0].complete", overlay))
    assert not photo.is_displayed() and overlay.is_displayed()
    natural = page.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", overlay)
    assert natural == [451, 300]
    box = rect(page, overlay)
    assert box["w"] > 100 and box["h"] / box["w"] == pytest.approx(300 / 451, abs=0.01)  # not squashed
    assert rect(page, frame) == pytest.approx(box, abs=0.5)  # the grey is exactly behind it
    grey = page.execute_script("return getComputedStyle(arguments[0]).backgroundColor", frame)
    assert grey == "rgb(138, 141, 145)"
    assert page.execute_script("return getComputedStyle(arguments[0]).opacity", overlay) == "1"
    # Nothing to fade into or hide from: no toggle or slider, but the legend explains the colours.
    assert not card.find_element(By.CLASS_NAME, "heatmap-toggle").is_displayed()
    assert not card.find_element(By.CLASS_NAME, "heatmap-opacity").is_displayed()
    assert card.find_element(By.CLASS_NAME, "heatmap-legend").is_displayed()
    assert script_errors(page) == []
    save_screenshot(page, tmp_path, "overlay-alone.png")


def test_non_image_shows_the_servers_own_error_message(page: WebDriver, service_url: str, upload_files):
    pick_files(page, upload_files["text"])
    (card,) = wait_for_cards(page, 1)

    response = classify_via_api(service_url, upload_files["text"], "text/plain")
    assert response.status_code == 415
    message = response.json()["error"]["message"]
    error = card.find_element(By.CLASS_NAME, "error")
    assert error.is_displayed()
    assert error.get_attribute("role") == "alert"
    assert error.text == message
    assert card.find_elements(By.CSS_SELECTOR, ".predictions > li") == []
    assert "failed" in page.find_element(By.ID, "status").text


def test_good_and_bad_files_together_fail_alone(page: WebDriver, service_url: str, upload_files, tmp_path):
    pick_files(page, upload_files["chelsea"], upload_files["text"])
    good, bad = wait_for_cards(page, 2)  # in the order picked
    assert "is-done" in good.get_attribute("class")
    assert len(good.find_elements(By.CSS_SELECTOR, ".predictions > li")) == 5  # the default top_k
    assert not good.find_element(By.CLASS_NAME, "error").is_displayed()
    assert "is-failed" in bad.get_attribute("class")
    refused = classify_via_api(service_url, upload_files["text"], "text/plain").json()["error"]["message"]
    assert bad.find_element(By.CLASS_NAME, "error").text == refused
    save_screenshot(page, tmp_path, "screenshot.png")


def test_file_names_and_server_text_are_never_parsed_as_html(page: WebDriver, upload_files):
    # A non-image under a name made of markup: the server's error may quote the name back.
    upload_files["markup"].write_bytes(b"not a jpeg at all")
    pick_files(page, upload_files["markup"])
    (card,) = wait_for_cards(page, 1)
    assert card.find_element(By.CLASS_NAME, "card-title").text == upload_files["markup"].name
    assert card.find_elements(By.CSS_SELECTOR, ".card-title img, .error img, .prediction-column img") == []
    assert page.execute_script("return window.__pwned") is None


def test_phone_width_fits_and_every_control_is_labelled_and_shows_focus(page: WebDriver, upload_files):
    # A 375 px phone viewport (headless Chromium will not shrink a window below 500 px, so emulate it).
    page.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 375, "height": 800, "deviceScaleFactor": 1, "mobile": True}
    )
    assert page.execute_script("return window.innerWidth") == 375
    pick_files(page, upload_files["chelsea"])
    (card,) = wait_for_cards(page, 1)
    # No sideways scrolling at phone width, and the photo stays inside its card.
    assert page.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    card_box = rect(page, card)
    photo_box = rect(page, card.find_element(By.CLASS_NAME, "photo"))
    assert photo_box["x"] >= card_box["x"] and photo_box["x"] + photo_box["w"] <= card_box["x"] + card_box["w"] + 0.5

    unlabelled = page.execute_script(
        """
        return [...document.querySelectorAll('input, button, select, textarea')].filter((el) => {
          const named = (el.labels && [...el.labels].some((l) => l.textContent.trim()))
            || (el.getAttribute('aria-label') || '').trim() || el.getAttribute('aria-labelledby')
            || (el.tagName === 'BUTTON' && el.textContent.trim());
          return !named;
        }).map((el) => el.outerHTML);
        """
    )
    assert unlabelled == []

    # Keyboard: Tab from the top reaches the file picker, and the focused control is visibly outlined.
    page.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);")
    body = page.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.TAB)  # skip link
    assert page.switch_to.active_element.get_attribute("class") == "skip-link"
    page.switch_to.active_element.send_keys(Keys.TAB)
    focused = page.switch_to.active_element
    assert focused.get_attribute("id") == "file-input"
    label = page.find_element(By.CSS_SELECTOR, "label[for=file-input]")
    assert page.execute_script("return getComputedStyle(arguments[0]).outlineStyle", label) != "none"
