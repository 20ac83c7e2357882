"""Fixtures for the deployment checks: the repo's deploy files, a small offline kustomize, the app's metrics.

The kustomize here renders only what our kustomizations use (resources, labels, images, JSON 6902 patches) and
refuses any other key, so a new kustomize feature cannot slip past the schema checks unrendered.
"""

from __future__ import annotations

import asyncio
import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"

# Labels Prometheus attaches to every scraped series (target labels), beyond the app's own.
TARGET_LABELS = {"instance", "job", "service", "le", "quantile"}


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# ---- a small kustomize ---------------------------------------------------------------------------------------

_SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "labels", "images", "patches"}


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer must start with '/': {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _parent(doc: Any, parts: list[str]) -> Any:
    for part in parts[:-1]:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/replace/remove/test, the subset our overlays use. Raises on a failed test or a bad path."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        parent, key = _parent(doc, parts), parts[-1]
        kind = op["op"]
        if kind == "test":
            actual = parent[int(key)] if isinstance(parent, list) else parent[key]
            if actual != op["value"]:
                raise AssertionError(f"patch test failed at {op['path']}: {actual!r} != {op['value']!r}")
        elif kind == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if key == "-" else int(key), op["value"])
            else:
                parent[key] = op["value"]
        elif kind == "replace":
            if isinstance(parent, list):
                parent[int(key)] = op["value"]
            else:
                if key not in parent:
                    raise KeyError(f"replace of a missing path {op['path']}")
                parent[key] = op["value"]
        elif kind == "remove":
            del parent[int(key) if isinstance(parent, list) else key]
        else:
            raise ValueError(f"unsupported patch op {kind!r}")
    return doc


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _set_image(image: str, rules: list[dict[str, str]]) -> str:
    name, _, tag = image.partition(":")
    for rule in rules:
        if rule["name"] == name:
            return f"{rule.get('newName', name)}:{rule.get('newTag', tag or 'latest')}"
    return image


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """Render `directory`/kustomization.yaml the way `kubectl kustomize` would for the keys we use."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _SUPPORTED_KEYS
    if unknown:
        raise NotImplementedError(f"{directory}: kustomization keys {sorted(unknown)} not rendered by this test")
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        docs.extend(render_kustomization(path) if path.is_dir() else load_yaml_documents(path))
    for label_set in kustomization.get("labels", []):
        if label_set.get("includeSelectors") or label_set.get("includeTemplates"):
            raise NotImplementedError("labels with includeSelectors/includeTemplates")
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label_set["pairs"])
    for patch in kustomization.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        target = patch["target"]
        matched = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        if len(matched) != 1:
            raise AssertionError(f"patch {patch['path']} matches {len(matched)} resources, expected 1")
        docs[docs.index(matched[0])] = apply_json_patch(matched[0], ops)
    for doc in docs:
        for container in _containers(doc):
            container["image"] = _set_image(container["image"], kustomization.get("images", []))
    return docs


OVERLAYS = ("cpu", "gpu")


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """{"base": [...], "cpu": [...], "gpu": [...]}: every resource, rendered."""
    out = {"base": render_kustomization(K8S / "base")}
    for overlay in OVERLAYS:
        out[overlay] = render_kustomization(K8S / "overlays" / overlay)
    return out


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


# ---- the app's metrics ------------------------------------------------------------------------------------------


async def _exported_after_traffic(artifact: Path) -> list:
    """The metric families a running app exports once it has answered one image and refused one upload: labelled
    series only appear once something was counted with labels."""
    from tests.app.fixtures import make_settings, png_bytes, running_app

    async with running_app(make_settings(artifact, warmup="none")) as (client, service):
        assert service.models.ready, service.models.message
        answered = await client.post("/classify", content=png_bytes(1), headers={"Content-Type": "image/png"})
        refused = await client.post("/classify", content=b"not an image", headers={"Content-Type": "image/png"})
        assert (answered.status_code, refused.status_code) == (200, 400)
        service.metrics.enable_gpu_gauges()  # what the app does when it serves on CUDA
        return list(service.metrics.registry.collect())


@pytest.fixture(scope="session")
def app_series(tiny_artifact: Path) -> dict[str, set[str]]:
    """Every series name the app exports -> its label names, read through the registry's public API from a running
    app (GPU gauges included), process collector's petvit_process_* too."""
    series: dict[str, set[str]] = {}
    for family in asyncio.run(_exported_after_traffic(tiny_artifact)):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


_SELECTOR = re.compile(r"\b(petvit_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def promql_selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """[(metric name, {label: (operator, value)})] for every petvit_* selector in a PromQL expression."""
    out = []
    for match in _SELECTOR.finditer(expr):
        matchers = {m.group(1): (m.group(2), m.group(3)) for m in _MATCHER.finditer(match.group(2) or "")}
        out.append((match.group(1), matchers))
    return out


def assert_expr_uses_real_series(expr: str, series: dict[str, set[str]], where: str) -> None:
    selectors = promql_selectors(expr)
    assert selectors, f"{where}: no petvit_* metric in {expr!r}"
    for name, matchers in selectors:
        assert name in series, f"{where}: {name} is not a series the app exports ({expr!r})"
        unknown = set(matchers) - series[name] - TARGET_LABELS
        assert not unknown, f"{where}: {name} has no label(s) {sorted(unknown)}"


@pytest.fixture(scope="session")
def app_routes() -> dict[str, set[str]]:
    """path -> HTTP methods, from the app's own OpenAPI schema (no model is loaded: that needs the lifespan)."""
    from app.config import Settings
    from app.main import create_app

    paths = create_app(Settings()).openapi()["paths"]
    return {path: {method.upper() for method in operations} for path, operations in paths.items()}


@pytest.fixture(scope="session")
def setting_names() -> set[str]:
    """Every environment variable the service reads: PETVIT_ + each Settings field."""
    from app.config import Settings

    return {f"PETVIT_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="session")
def petvit_args():
    """parse(argv) -> argparse.Namespace through the real `petvit` CLI (cli.main), so a renamed flag or a value
    outside a flag's choices in a deploy file fails here rather than in a container at start-up."""
    import argparse
    import importlib

    from cli.main import COMMANDS

    def parse(argv: list[str]) -> argparse.Namespace:
        assert argv and argv[0] in COMMANDS, f"{argv[:1]} is not a petvit subcommand"
        parser = argparse.ArgumentParser(prog=f"petvit {argv[0]}", exit_on_error=False)
        importlib.import_module(COMMANDS[argv[0]][0]).add_arguments(parser)
        try:
            return parser.parse_args(argv[1:])
        except (argparse.ArgumentError, SystemExit) as err:
            raise AssertionError(f"petvit refuses {' '.join(argv)}: {err}") from err

    return parse


# Test modules cannot import this conftest (pytest --import-mode=importlib), so helpers travel as fixtures.
@pytest.fixture(scope="session")
def json_patch():
    return apply_json_patch


@pytest.fixture(scope="session")
def find_resource():
    return find


@pytest.fixture(scope="session")
def check_expr(app_series):
    def check(expr: str, where: str) -> None:
        assert_expr_uses_real_series(expr, app_series, where)

    return check


@pytest.fixture(scope="session")
def selectors():
    return promql_selectors
