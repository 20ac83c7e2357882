"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis + Hypothesis).

Every operation the service publishes at /openapi.json is called with requests generated from that schema (valid
and invalid ones: random bodies, parameters, binary "images"), against a live uvicorn on a loopback port. No answer
may be a 5xx, and every answer must match what the schema declares: a documented status, its content type, its
body schema and headers. Schema-valid but semantically wrong requests (random bytes declared as an image) are
refused with a documented 4xx; that is correct behaviour, so schemathesis' "valid data must be accepted" check is
not among those run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis import checks

from .fixtures import live_server, make_settings

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


ADMIN_KEY = "fuzz-admin-key"


@pytest.fixture(scope="module")
def live_url(tiny_artifact: Path) -> Iterator[str]:
    # The admin key mounts POST /v1/admin/reload, so the fuzzer reaches it too: random checkpoints and bodies must
    # get documented 4xx answers (403 for a path outside the model folder), and an empty body reloads the live
    # artifact (200).
    with live_server(make_settings(tiny_artifact, admin_key=ADMIN_KEY)) as url:
        yield url


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda mode: mode.value)
def test_every_operation_survives_generated_requests(live_url: str, mode: schemathesis.GenerationMode) -> None:
    """positive: requests the schema allows; negative: requests it forbids (bad types, out-of-range top_k, ...)."""
    schema = schemathesis.openapi.from_url(f"{live_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    names = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {
        "POST /classify",
        "GET /healthz",
        "GET /readyz",
        "GET /v1/model",
        "GET /metrics",
        "POST /v1/admin/reload",
    } <= names
    calls: dict[str, int] = {}
    reload_statuses: set[int] = set()
    for operation in operations:
        if mode == schemathesis.GenerationMode.NEGATIVE and not (len(operation.query) or len(operation.body)):
            continue  # nothing to break: GET /healthz takes no input

        @given(case=operation.as_strategy(generation_mode=mode))
        # derandomize: the same examples on every run and machine, so the suite never passes or fails by the draw
        @hypothesis_settings(
            max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
        )
        def call(case: schemathesis.Case) -> None:
            response = case.call_and_validate(base_url=live_url, checks=CHECKS, headers={"X-Admin-Key": ADMIN_KEY})
            calls[case.operation.label] = calls.get(case.operation.label, 0) + 1
            if case.operation.label == "POST /v1/admin/reload":
                reload_statuses.add(response.status_code)

        call()
    assert calls.get("POST /classify", 0) >= 10, calls  # the endpoint that takes uploads was really exercised
    assert calls.get("POST /v1/admin/reload", 0) >= 5, calls
    if mode == schemathesis.GenerationMode.POSITIVE:  # random checkpoint paths: outside the model folder, refused
        assert 403 in reload_statuses, reload_statuses


def test_the_classify_schema_needs_at_least_one_image(live_url: str) -> None:
    """An empty multipart form (no `file` field, or none in it) is answered 422 no_images, so the schema must not
    call it valid: `file` is required with at least one item; a raw image body is the declared alternative."""
    import httpx
    import jsonschema

    spec = httpx.get(f"{live_url}/openapi.json").json()
    body = spec["paths"]["/classify"]["post"]["requestBody"]
    assert body["required"] is True
    multipart = body["content"]["multipart/form-data"]["schema"]
    validator = jsonschema.Draft202012Validator(multipart)
    assert not validator.is_valid({}) and not validator.is_valid({"file": []})
    assert validator.is_valid({"file": ["<binary>"]})
    assert {"image/jpeg", "image/png", "image/webp"} <= set(body["content"])  # one image as the raw body
    answered = httpx.post(
        f"{live_url}/classify", content=b"--b--\r\n", headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert answered.status_code == 422 and answered.json()["error"]["code"] == "no_images"
