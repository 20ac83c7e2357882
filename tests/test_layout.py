"""The rooms keep their shape: dependencies point one way (cli -> app, training -> model), the model library needs
only its five packages, the service runs without matplotlib, and every function reads on one screen."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "training", "app", "cli")
# What each package may import from the others. cli wires everything; nothing imports cli.
MAY_IMPORT = {"model": set(), "training": {"model"}, "app": {"model"}, "cli": {"model", "training", "app"}}
# The model library is for anyone who wants the network: torch, torchvision, numpy, pillow and safetensors only.
MODEL_THIRD_PARTY = {"torch", "torchvision", "numpy", "PIL", "safetensors"}
# Optional extras model/ may import only lazily, inside the function that needs them: torchao is the `[int8]` extra
# (model/inference.py quantises with it when int8 is asked for), so `import model` works without it.
# huggingface_hub is the `[import]` extra: model/convert/hub.py fetches `hf-hub:` sources with it, and nothing else
# does.
MODEL_LAZY_EXTRAS = {"torchao", "huggingface_hub", "transformers"}  # transformers: --zero-shot text towers
MAX_FUNCTION_LINES = 80


def imported_top_levels(path: Path) -> set[str]:
    """Every top-level module a file imports, at module level or inside a function (lazy imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def module_level_imports(path: Path) -> set[str]:
    """The top-level modules a file imports outside any function body: what importing the file itself needs.
    Imports under `if TYPE_CHECKING:` never run, so they count as lazy."""
    lazy: set[int] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        type_only = isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        if type_only or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lazy.update(id(inner) for inner in ast.walk(node) if inner is not node)
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in lazy:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def package_files(package: str) -> list[Path]:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    return files


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package: str) -> None:
    forbidden = set(PACKAGES) - MAY_IMPORT[package] - {package}
    offenders = {
        f"{path.relative_to(REPO)} imports {sorted(found)}"
        for path in package_files(package)
        if (found := imported_top_levels(path) & forbidden)
    }
    assert not offenders, f"{package}/ may import only {sorted(MAY_IMPORT[package])}: {sorted(offenders)}"


def test_model_library_needs_only_torch_torchvision_numpy_pillow_safetensors() -> None:
    allowed = MODEL_THIRD_PARTY | set(sys.stdlib_module_names) | {"model", "__future__"}
    extra = {
        f"{path.relative_to(REPO)}: {sorted(found)}"
        for path in package_files("model")
        if (found := imported_top_levels(path) - allowed - MODEL_LAZY_EXTRAS)
    }
    assert not extra, f"model/ imports more than {sorted(MODEL_THIRD_PARTY)}: {sorted(extra)}"
    eager_extras = {
        f"{path.relative_to(REPO)}: {sorted(found)}"
        for path in package_files("model")
        if (found := module_level_imports(path) & MODEL_LAZY_EXTRAS)
    }
    assert not eager_extras, f"model/ may import {sorted(MODEL_LAZY_EXTRAS)} only inside functions: {eager_extras}"


def test_the_guard_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The scan must catch a lazy import inside a function, not only module-level ones."""
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\n\ndef f():\n    from training.loop import train\n    import app.main\n")
    assert imported_top_levels(sample) == {"torch", "training", "app"}
    assert module_level_imports(sample) == {"torch"}


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=240
    )


def test_importing_the_model_library_loads_no_service_or_training_code() -> None:
    result = run_python(
        """
        import sys
        import model
        from model import ViT, load_artifact, attention_rollout
        from model.inference import prepare_for_inference
        # (tqdm is not checked: torch.hub imports it when it happens to be installed)
        heavy = ("fastapi", "pydantic", "matplotlib", "training", "app", "cli", "torchao", "huggingface_hub")
        heavy = sorted(m for m in heavy if m in sys.modules)
        print("loaded:", heavy)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout


def test_service_and_serve_help_work_without_matplotlib(tiny_artifact: Path, chelsea) -> None:
    """`pip install .` has no matplotlib: the service must start, classify and answer without it."""
    photo = tiny_artifact.parent / "layout-chelsea.png"
    chelsea.save(photo)
    result = run_python(
        f"""
        import sys
        sys.modules["matplotlib"] = None  # `import matplotlib` now raises ImportError, as on a service-only install
        try:
            import matplotlib
        except ImportError:
            pass
        else:
            raise SystemExit("matplotlib is still importable")

        from fastapi.testclient import TestClient
        from app.config import Settings
        from app.main import create_app

        settings = Settings(checkpoint={str(tiny_artifact)!r}, device="cpu", warmup="none")
        with TestClient(create_app(settings)) as client:
            for _ in range(500):
                if client.get("/readyz").status_code == 200:
                    break
                __import__("time").sleep(0.01)
            with open({str(photo)!r}, "rb") as f:
                response = client.post("/classify?top_k=3", files={{"file": ("cat.png", f, "image/png")}})
            print("classify", response.status_code, len(response.json()["results"][0]["predictions"]))
        print("training loaded:", "training" in sys.modules)

        from cli.main import main
        try:
            main(["serve", "--help"])
        except SystemExit as exit:
            print("serve --help exit", exit.code)
        print("train without the extra:", main(["train", "--help"]))
        """
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "classify 200 3" in result.stdout
    assert "training loaded: False" in result.stdout
    assert "serve --help exit 0" in result.stdout
    assert "--port" in result.stdout  # the help text itself was printed
    # A training command on a service-only install says which extra it needs instead of a traceback.
    assert "train without the extra: 2" in result.stdout
    assert "petvit train: needs matplotlib, part of the training extra: pip install 'petvit[train]'" in result.stderr


def test_packaging_keeps_training_packages_in_the_train_extra() -> None:
    """`pip install .` is the service; `.[train]` adds what training needs; `.[dev]` includes `.[train]`."""
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    base = {re.split(r"[<>=\[ ]", dep)[0] for dep in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert {"matplotlib", "tqdm"}.isdisjoint(base)
    assert {"torch", "torchvision", "numpy", "pillow", "safetensors", "fastapi", "uvicorn"} <= base
    assert {re.split(r"[<>=]", dep)[0] for dep in extras["train"]} == {"matplotlib", "tqdm"}
    assert {re.split(r"[<>=]", dep)[0] for dep in extras["int8"]} == {"torchao"}  # optional: int8 serving only
    assert "torchao" not in base
    assert "petvit[train]" in extras["dev"] and "petvit[int8]" in extras["dev"]
    packages = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    )
    assert {f"{p}*" for p in PACKAGES} == packages
    assert project["scripts"]["petvit"] == "cli.main:main"


def long_functions(root: Path) -> list[str]:
    """Functions over MAX_FUNCTION_LINES lines; argparse builders (add_arguments) are exempt: plain option lists."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name != "add_arguments":
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_every_function_reads_on_one_screen(package: str) -> None:
    assert not long_functions(REPO / package), f"split these into named steps: {long_functions(REPO / package)}"


def test_no_test_module_imports_another_test_module() -> None:
    """Shared helpers live in conftest.py or fixture modules; a test module importing another couples their fates."""
    offenders = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.rsplit(".", 1)[-1].startswith("test_"):
                    offenders.append(f"{path.relative_to(REPO)} imports {node.module}")
            elif isinstance(node, ast.Import):
                offenders += [
                    f"{path.relative_to(REPO)} imports {a.name}"
                    for a in node.names
                    if a.name.rsplit(".", 1)[-1].startswith("test_")
                ]
    assert not offenders, offenders


# The one CLS-feature path (issue 18): the network's feature forwards and forward hooks are model/'s business;
# everything else asks model/inference.py (Classifier, batch_outputs, InferenceModel).
FEATURE_CALLS = {"forward_features", "forward_with_features", "register_forward_hook"}


def feature_calls(path: Path) -> list[str]:
    """`x.forward_features(...)`-style calls in a file, as 'path:line name'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}:{node.lineno} {node.func.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FEATURE_CALLS
    ]


def test_only_model_reads_features_or_hooks_the_network() -> None:
    outside = [
        p for room in ("app", "cli", "training", "bench", "scripts", "deploy") for p in (REPO / room).rglob("*.py")
    ]
    assert len(outside) > 50
    assert [call for path in outside for call in feature_calls(path)] == []


def test_the_feature_guard_sees_a_call(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f(model, x):\n    return model.forward_with_features(x)\n")
    assert feature_calls(sneaky) == ["sneaky.py:2 forward_with_features"]
