"""deploy/kserve/inferenceservice.yaml: valid against KServe's own InferenceService CRD (the copy in
deploy/kserve/schema/, strict about unknown fields), and consistent with the app (the image's command line, the
port, probe paths that are real routes, settings the service reads) and with deploy/k8s (the artifacts claim)."""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from app.config import Settings

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "kserve"
CRD = KSERVE / "schema" / "serving.kserve.io_inferenceservices.yaml"
SERVE_PORT = 8000
MODEL_MOUNT = "/mnt/models"  # where KServe's storage initializer puts what STORAGE_URI names


def strict(schema: Any) -> Any:
    """The CRD schema, refusing unknown fields wherever it lists the known ones. A CRD's structural schema leaves
    unknown fields to the API server, which drops them silently (or refuses them with --validate=strict): without
    this a misspelt `scaleMetrc` would pass."""
    if isinstance(schema, dict):
        out = {key: strict(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def validator() -> jsonschema.Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD is 2 MB: libyaml reads it in a second
    crd = yaml.load(CRD.read_text(), Loader=loader)
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "InferenceService"
    (v1beta1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema = strict(v1beta1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.fixture(scope="module")
def isvc() -> dict[str, Any]:
    (doc,) = [d for d in yaml.safe_load_all((KSERVE / "inferenceservice.yaml").read_text()) if d]
    return doc


def container(isvc: dict[str, Any]) -> dict[str, Any]:
    (only,) = isvc["spec"]["predictor"]["containers"]
    return only


def env(isvc: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(isvc)["env"]}


def test_the_schema_is_kserves_crd_as_its_source_note_says():
    note = (KSERVE / "schema" / "SOURCE.md").read_text()
    (sha,) = re.findall(r"sha256 `([0-9a-f]{64})`", note)
    assert hashlib.sha256(CRD.read_bytes()).hexdigest() == sha
    assert "kserve/kserve" in note and re.search(r"v0\.\d+", note)


def test_the_inferenceservice_validates_against_kserves_crd(validator, isvc):
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    errors = sorted(validator.iter_errors(isvc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "predictor", "scaleMetrc"), "concurrency"),  # unknown field
        (("spec", "predictor", "scaleMetric"), "latency"),  # outside the enum
        (("spec", "predictor", "scaleTarget"), "8"),  # a string where an integer goes
        (("spec", "predictor", "containers", 0, "readinessProbe", "httpGett"), {"path": "/readyz"}),
    ],
)
def test_the_validator_refuses_what_kserve_would(validator, isvc, path, value):
    """Guards the test above: a typo, a bad enum value, a wrong type must each fail."""
    broken = copy.deepcopy(isvc)
    target = broken
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert list(validator.iter_errors(broken))


def test_it_runs_our_image_as_a_custom_predictor_on_the_served_port(isvc, petvit_args):
    predictor = isvc["spec"]["predictor"]
    assert not {"model", "pytorch", "sklearn", "triton"} & set(predictor), "a custom container, not a runtime"
    api = container(isvc)
    assert api["name"] == "kserve-container"
    assert api["image"].split(":")[0].endswith("petvit")
    serve = petvit_args(api["args"])
    assert (serve.host, serve.port) == ("0.0.0.0", SERVE_PORT)
    (port,) = api["ports"]  # Knative routes to exactly one port
    assert port["containerPort"] == SERVE_PORT and port.get("name", "http1") in {"http1", "h2c"}


def test_probes_hit_real_routes_readiness_on_readyz_liveness_on_healthz(isvc, app_routes):
    api = container(isvc)
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        get = api[probe]["httpGet"]
        assert "GET" in app_routes[get["path"]]
        assert get.get("port", SERVE_PORT) == SERVE_PORT  # Knative refuses any port but the container's


def test_it_autoscales_on_concurrency_within_bounds(isvc):
    predictor = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"  # Knative's KPA
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] >= 1
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"], "min 1: a cold start loads the model"
    # A replica's soft target should let batches form, and not exceed what one replica will queue.
    assert predictor["scaleTarget"] <= Settings(**settings_in(isvc)).queue_limit


def test_a_spec_change_rolls_out_as_a_canary(isvc):
    percent = isvc["spec"]["predictor"]["canaryTrafficPercent"]
    assert 0 < percent < 100


def settings_in(isvc: dict[str, Any]) -> dict[str, str]:
    return {k.removeprefix("PETVIT_").lower(): v for k, v in env(isvc).items() if k.startswith("PETVIT_")}


def test_env_names_are_settings_the_service_reads(isvc, setting_names):
    names = {k for k in env(isvc) if k.startswith("PETVIT_")}
    assert names <= setting_names, f"unknown settings {sorted(names - setting_names)}"
    assert set(env(isvc)) - names == {"STORAGE_URI"}
    Settings(**settings_in(isvc))


def test_the_model_comes_from_the_claim_the_training_job_writes(isvc, rendered, find_resource):
    values = env(isvc)
    checkpoint = Path(values["PETVIT_CHECKPOINT"])
    assert checkpoint.parent == Path(MODEL_MOUNT) == Path(values["PETVIT_MODEL_DIRS"])  # reloads: from there only
    scheme, _, claim = values["STORAGE_URI"].partition("://")
    assert scheme == "pvc"
    pvc = find_resource(rendered["base"], "PersistentVolumeClaim", claim.split("/")[0])
    (train,) = find_resource(rendered["base"], "Job", "petvit-train")["spec"]["template"]["spec"]["containers"]
    out = Path(train["args"][train["args"].index("--out") + 1])
    assert out.name == checkpoint.name, "the Job writes another file name than the predictor serves"
    assert pvc["metadata"]["name"] == claim.split("/")[0]


def test_it_runs_as_the_images_non_root_user(isvc):
    security = container(isvc)["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert "securityContext" not in isvc["spec"]["predictor"], "pod-level securityContext is behind a Knative flag"
