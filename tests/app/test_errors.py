"""Every failure answers JSON {"error": {"code", "message"}} with the HTTP status of its kind."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from PIL import Image

from .fixtures import encode, make_settings, noise_image, png_bytes, running_app


def error_of(response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    return response.json()["error"]


async def test_undecodable_upload_is_400(client):
    response = await client.post("/classify", files={"file": ("x.jpg", b"this is not an image", "image/jpeg")})
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "undecodable_image" and "x.jpg" in error["message"]


async def test_truncated_jpeg_is_400(client, chelsea):
    data = encode(chelsea)[:600]
    response = await client.post("/classify", content=data, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 400 and error_of(response)["code"] == "undecodable_image"


async def test_api_key_is_required_when_configured(tiny_artifact):
    async with running_app(make_settings(tiny_artifact, api_key="s3cret")) as (client, _):
        body = {"content": png_bytes(1), "headers": {"Content-Type": "image/png"}}
        missing = await client.post("/classify", **body)
        wrong = await client.post(
            "/classify", content=body["content"], headers={**body["headers"], "X-API-Key": "guess"}
        )
        right = await client.post(
            "/classify", content=body["content"], headers={**body["headers"], "X-API-Key": "s3cret"}
        )
        health = await client.get("/healthz")
    assert missing.status_code == wrong.status_code == 401
    assert error_of(missing)["code"] == error_of(wrong)["code"] == "unauthorized"
    assert right.status_code == 200 and health.status_code == 200


async def test_too_many_bytes_is_413_before_the_body_is_read(tiny_artifact):
    async with running_app(make_settings(tiny_artifact, max_upload_bytes=2000)) as (client, _):
        chunks_sent = 0

        async def body():
            nonlocal chunks_sent
            for _ in range(1000):  # 1 MB offered in 1 kB chunks; the service must stop reading early
                chunks_sent += 1
                yield b"\xff" * 1000

        response = await client.post("/classify", content=body(), headers={"Content-Type": "image/jpeg"})
        multipart = await client.post("/classify", files={"file": ("big.png", png_bytes(1, (200, 200)), "image/png")})
    assert response.status_code == 413 and error_of(response)["code"] == "upload_too_large"
    assert chunks_sent < 10
    assert multipart.status_code == 413 and error_of(multipart)["code"] == "upload_too_large"


async def test_declared_content_length_over_the_limit_is_413(tiny_artifact):
    async with running_app(make_settings(tiny_artifact, max_upload_bytes=1000)) as (client, _):
        response = await client.post("/classify", content=b"\0" * 5000, headers={"Content-Type": "image/png"})
    assert response.status_code == 413 and "5000" in error_of(response)["message"]


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with almost no data: the pixel check must use the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


async def test_too_many_pixels_is_413_from_the_header(tiny_artifact):
    async with running_app(make_settings(tiny_artifact, max_pixels=10_000)) as (client, _):
        over = await client.post("/classify", content=png_bytes(1, (200, 100)), headers={"Content-Type": "image/png"})
        bomb = await client.post("/classify", content=_bomb_png(60000, 60000), headers={"Content-Type": "image/png"})
    assert over.status_code == 413 and error_of(over)["code"] == "image_too_large"
    assert "200x100" in error_of(over)["message"]
    assert bomb.status_code == 413 and error_of(bomb)["code"] == "image_too_large"


async def test_pil_decompression_bomb_guard_maps_to_413(client, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own guard trips before ours (limit 40 M)
    response = await client.post("/classify", content=png_bytes(1, (100, 100)), headers={"Content-Type": "image/png"})
    assert response.status_code == 413 and error_of(response)["code"] == "image_too_large"


async def test_too_many_files_is_413(tiny_artifact):
    async with running_app(make_settings(tiny_artifact, max_files=2)) as (client, _):
        files = [("file", (f"{i}.png", png_bytes(i), "image/png")) for i in range(3)]
        response = await client.post("/classify", files=files)
    assert response.status_code == 413 and error_of(response)["code"] == "too_many_files"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, "text/plain"),
        ({"files": {"file": ("notes.txt", b"hello", "text/plain")}}, "text/plain"),
        ({"content": b"{}", "headers": {"Content-Type": "application/json"}}, "application/json"),
    ],
)
async def test_non_image_types_are_415(client, kwargs, fragment):
    response = await client.post("/classify", **kwargs)
    assert response.status_code == 415
    error = error_of(response)
    assert error["code"] == "unsupported_media_type" and fragment in error["message"]


async def test_image_formats_we_do_not_read_are_415(client):
    ico = io.BytesIO()
    noise_image(1, (32, 32)).save(ico, format="ICO")
    response = await client.post("/classify", content=ico.getvalue(), headers={"Content-Type": "image/x-icon"})
    assert response.status_code == 415 and "ICO" in error_of(response)["message"]


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64, "HEIC"),  # what an iPhone sends by default
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "SVG"),
    ],
)
async def test_image_types_pil_cannot_identify_are_415_not_corrupt(client, data, kind):
    response = await client.post("/classify", files={"file": ("photo", data, "image/*")})
    assert response.status_code == 415, response.text
    error = error_of(response)
    assert error["code"] == "unsupported_media_type" and kind in error["message"] and "JPEG" in error["message"]


async def test_multipart_without_file_fields_is_422(client):
    response = await client.post("/classify", data={"other": "x"}, files={"note": (None, b"just text")})
    assert response.status_code == 422 and error_of(response)["code"] == "no_images"


@pytest.mark.parametrize("field", ["image", "images", "files", "photo", "file[]"])
async def test_an_image_under_another_field_name_is_422_naming_the_field(client, field):
    """Was: `413 upload_too_large: a form field is over the 65536 byte limit` for any image over 64 kB."""
    big = encode(noise_image(3, (400, 300)), "PNG")
    assert len(big) > 65536  # the size that used to trip the form-field limit
    response = await client.post("/classify", files={field: ("cat.png", big, "image/png")})
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["code"] == "wrong_field"
    assert f"`{field}`" in error["message"] and "fields named `file`" in error["message"]
    # Declared as an image without a file name (some clients do that) is the same mistake.
    response = await client.post(
        "/classify",
        content=b'--b\r\nContent-Disposition: form-data; name="image"\r\nContent-Type: image/png\r\n\r\n'
        + big
        + b"\r\n--b--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 422 and error_of(response)["code"] == "wrong_field"


async def test_bad_query_parameter_is_422(client):
    response = await client.post(
        "/classify", params={"heatmap": "perhaps"}, content=png_bytes(1), headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 422
    error = error_of(response)
    assert error["code"] == "invalid_parameters" and "heatmap" in error["message"]


async def test_unknown_route_and_wrong_method_are_json(client):
    missing = await client.get("/nope")
    wrong = await client.get("/classify")
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    assert wrong.status_code == 405 and error_of(wrong)["code"] == "method_not_allowed"


async def test_missing_artifact_keeps_the_process_up_with_503_naming_path_and_command(tmp_path, caplog):
    path = tmp_path / "nowhere" / "model.safetensors"
    async with running_app(make_settings(path)) as (client, service):
        health = await client.get("/healthz")
        ready = await client.get("/readyz")
        classify = await client.post("/classify", content=png_bytes(1), headers={"Content-Type": "image/png"})
        model = await client.get("/v1/model")
        assert service.models.status == "failed"
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    for response in (ready, classify, model):
        assert response.status_code == 503
        error = error_of(response)
        assert error["code"] == "not_ready"
        assert (
            str(path) in error["message"] and "petvit export" in error["message"] and "petvit train" in error["message"]
        )
    assert any(str(path) in r.getMessage() and "petvit export" in r.getMessage() for r in caplog.records)


async def test_corrupt_artifact_is_503_with_the_reason(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x80\x04garbage")  # a pickle's first bytes
    async with running_app(make_settings(path)) as (client, _):
        ready = await client.get("/readyz")
    assert ready.status_code == 503 and "pickle" in error_of(ready)["message"]


async def test_an_unexpected_load_error_fails_readiness_instead_of_loading_for_ever(tiny_artifact):
    def loader(settings):
        raise ValueError("metadata lists 36 labels for 37 classes")

    async with running_app(make_settings(tiny_artifact), loader) as (client, service):
        ready = await client.get("/readyz")
        assert service.models.status == "failed"
    assert ready.status_code == 503 and "36 labels" in error_of(ready)["message"]


@pytest.mark.parametrize(
    "content_type", ["multipart/form-data", "multipart/form-data; boundary=xyz", "multipart/form-data; boundary="]
)
async def test_broken_multipart_framing_is_400_whatever_is_broken(client, content_type):
    response = await client.post("/classify", content=b"\xff\xd8 not multipart", headers={"Content-Type": content_type})
    assert response.status_code == 400 and error_of(response)["code"] == "malformed_multipart"
