"""docker-compose.yml, docker-compose.gpu.yml, Dockerfile and .dockerignore: the wiring between them and the app.

When docker-compose (v1.29+) or `docker compose` is installed, its own `config` must accept the files too; every
petvit command line in them must be one the CLI accepts."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SERVE_PORT = 8000


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def expand_defaults(text: str) -> str:
    """${VAR:-default} -> default: what compose substitutes when the variable is unset."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text)


def dockerfile_instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in (raw.strip() for raw in joined.splitlines())
        if line and not line.startswith("#")
    ]


# ---- compose ----------------------------------------------------------------------------------------------------


def split_volume(volume: str) -> tuple[str, str, str]:
    """SOURCE:TARGET[:MODE] -> (source, target, mode), where SOURCE may be ${VAR:-default} (colons inside)."""
    source, target, mode = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(.+))?", volume).groups()
    return source, target, mode or ""


def mounts(service: dict) -> dict[str, str]:
    """container path -> source (with compose's defaults filled in) and mode: {"/artifacts": "./artifacts:ro"}."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, *mode = expand_defaults(volume).split(":")
        out[target] = ":".join([source, *mode])
    return out


def test_api_starts_with_train_and_serves_what_train_writes():
    """api waits for the artifact itself (entrypoint.py after-train) rather than for train to complete: with
    `service_completed_successfully`, a failed train stops `up` on v1.29 before any log (train's reason) shows."""
    services = compose()["services"]
    prepare, train, api = services["prepare"], services["train"], services["api"]
    assert api["depends_on"] == {
        "prepare": {"condition": "service_completed_successfully"},
        "train": {"condition": "service_started"},
    }
    assert train["depends_on"] == {"prepare": {"condition": "service_completed_successfully"}}
    assert api["entrypoint"] == ["python", "/compose/entrypoint.py", "after-train"]
    assert train["entrypoint"] == ["python", "/compose/entrypoint.py", "as-owner"]
    assert prepare["entrypoint"] == ["python", "/compose/entrypoint.py"] and prepare["command"] == ["prepare"]
    train_args = [expand_defaults(a) for a in train["command"]]
    assert train_args[0] == "train" and "--if-missing" in train_args
    assert flag(train_args, "--recipe") == "auto"  # picks the CPU recipe without a GPU
    out = flag(train_args, "--out")
    assert expand_defaults(api["environment"]["PETVIT_CHECKPOINT"]) == out and out.startswith("/artifacts/")
    # One host folder at /artifacts for all three (read-only for api), one at /data for prepare and train.
    artifacts = "./artifacts"
    assert mounts(prepare)["/artifacts"] == mounts(train)["/artifacts"] == artifacts
    assert mounts(api)["/artifacts"] == artifacts + ":ro"
    assert mounts(prepare)["/data"] == mounts(train)["/data"] == "./data" and "/data" not in mounts(api)
    assert flag(train_args, "--data-dir") == "/data" and train["environment"]["TORCH_HOME"].startswith("/data/")
    # train records its outcome where api reads it; the entrypoint is mounted, not baked into the image.
    assert mounts(prepare)["/status"] == mounts(train)["/status"] == "train-status"
    assert mounts(api)["/status"] == "train-status:ro"
    for service in (prepare, train, api):
        assert mounts(service)["/compose"] == "./deploy/compose:ro"
    assert train["image"] == api["image"] == prepare["image"] and train["build"] == api["build"]


def test_the_host_folders_the_messages_name_are_the_ones_mounted():
    """entrypoint.py and petvit's own messages (model/host_paths.py) turn /artifacts and /data back into host
    folders from PETVIT_HOST_MOUNTS: compose fills it from the same variables as the mounts, so the folder a message
    names is the folder mounted; PETVIT_RUN_COMMAND is how the messages suggest running petvit."""
    services = compose()["services"]
    for name in ("prepare", "train", "api"):
        service = services[name]
        sources = {target: source for source, target in (split_volume(v)[:2] for v in service["volumes"])}
        assert sources["/artifacts"] == "${PETVIT_ARTIFACTS_DIR:-./artifacts}"
        told = dict(pair.split("=", 1) for pair in service["environment"]["PETVIT_HOST_MOUNTS"].split(";"))
        assert told == {"/artifacts": sources["/artifacts"], "/data": "${PETVIT_DATA_DIR:-./data}"}, name
        assert sources.get("/data", told["/data"]) == told["/data"], name
        assert service["environment"]["PETVIT_RUN_COMMAND"] == "docker compose run --rm train"


def test_root_is_only_a_step_and_nothing_starts_before_the_api():
    services = compose()["services"]
    for name in ("prepare", "train", "api"):
        # as root only to chown Docker-created folders and switch user (entrypoint.py); never the image's default
        assert services[name]["user"] == "0:0", name
    assert "user" not in services["prometheus"] and "user" not in services["grafana"]
    assert services["train"]["init"] is services["api"]["init"] is True  # signals reach petvit, zombies reaped
    assert services["prepare"]["network_mode"] == "none" and services["prepare"]["restart"] == "no"
    # prometheus (and grafana after it) start after api: a failure before api leaves nothing half-up
    assert services["prometheus"]["depends_on"] == ["api"] and services["grafana"]["depends_on"] == ["prometheus"]


def test_api_healthcheck_polls_readiness_on_the_served_port():
    api = compose()["services"]["api"]
    test = " ".join(api["healthcheck"]["test"])
    assert f"http://127.0.0.1:{SERVE_PORT}/readyz" in test and "curl" not in test
    assert flag(api["command"], "--port") == str(SERVE_PORT)
    assert api["command"][0] == "serve"
    assert expand_defaults(api["ports"][0]) == f"{SERVE_PORT}:{SERVE_PORT}"
    assert compose()["services"]["train"]["healthcheck"] == {"disable": True}


def test_compose_passes_every_setting_through_and_no_unknown_ones(setting_names):
    fields = setting_names
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        env = {k for k in compose(name)["services"]["api"]["environment"] if k.startswith("PETVIT_")}
        env -= {"PETVIT_HOST_MOUNTS", "PETVIT_RUN_COMMAND"}
        assert env <= fields, f"{name}: unknown settings {sorted(env - fields)}"
    others = {k for k in compose()["services"]["api"]["environment"] if k not in fields}
    assert others == {"PETVIT_HOST_MOUNTS", "PETVIT_RUN_COMMAND"}  # how it was started: model/host_paths.py
    missing = fields - set(compose()["services"]["api"]["environment"])
    assert not missing, f"settings users cannot set through compose: {sorted(missing)}"


def test_every_bind_mount_and_build_context_exists():
    """Except the host folders for the model and the data: a first run creates those (prepare gives them to you)."""
    created_at_first_run = {"./artifacts", "./data"}
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        for service in compose(name)["services"].values():
            for volume in service.get("volumes", []):
                source = expand_defaults(volume).split(":")[0]
                if source.startswith("./") and source not in created_at_first_run:
                    assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            if "build" in service:
                assert (ROOT / service["build"]["context"] / "Dockerfile").is_file()
    declared = set(compose()["volumes"])
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source = expand_defaults(volume).split(":")[0]
            assert source.startswith(("./", "/")) or source in declared, f"undeclared volume {source}"


def test_gpu_override_reserves_nvidia_devices_and_serves_on_cuda():
    gpu = compose("docker-compose.gpu.yml")["services"]
    assert set(gpu) == {"prepare", "train", "api"} and set(gpu) <= set(compose()["services"])
    for name in ("train", "api"):
        (device,) = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["api"]["environment"]["PETVIT_DEVICE"] == "cuda"
    # the default file must run where there is no NVIDIA runtime
    assert "deploy" not in compose()["services"]["api"] and "nvidia" not in (ROOT / "docker-compose.yml").read_text()


def merged_build(files: list[str], service: str) -> tuple[str, dict[str, str]]:
    """(image, build args) of a service as compose merges the files: later files win key by key, defaults filled.
    scripts/compose-smoke.sh checks the same with `config` of docker-compose v1.29 and Compose v2 themselves."""
    image, args = "", {}
    for name in files:
        service_dict = compose(name)["services"].get(service, {})
        image = service_dict.get("image", image)
        args |= service_dict.get("build", {}).get("args", {})
    return expand_defaults(image), {k: expand_defaults(v) for k, v in args.items()}


@pytest.mark.parametrize("service", ["prepare", "train", "api"])
def test_compose_builds_the_cpu_flavour_unless_the_gpu_override_is_used(service):
    """A CPU-only user's `docker compose up` must not build the CUDA image (NVIDIA libraries it cannot use); the GPU
    override selects CUDA, under its own tag, so neither flavour's image replaces the other."""
    assert merged_build(["docker-compose.yml"], service) == ("petvit:cpu", {"TORCH_FLAVOR": "cpu"})
    gpu = merged_build(["docker-compose.yml", "docker-compose.gpu.yml"], service)
    assert gpu == ("petvit:cuda", {"TORCH_FLAVOR": "cuda"})
    assert compose()["services"][service]["build"]["context"] == "."


def test_every_petvit_command_line_is_one_the_cli_accepts(petvit_args):
    """compose's train and api commands, the image's CMD and the smoke test's export, through the real parser: a
    renamed flag or a recipe outside --recipe's choices fails here, not in a container after a long build."""
    services = compose()["services"]
    train = petvit_args([expand_defaults(a) for a in services["train"]["command"]])
    assert train.if_missing and train.dataset == "pets" and train.recipe == "auto" and train.device == "auto"
    assert (train.data_dir, train.out) == ("/data", "/artifacts/petvit.safetensors")
    api = petvit_args(services["api"]["command"])
    assert (api.host, api.port) == ("0.0.0.0", SERVE_PORT)
    (cmd,) = [arg for op, arg in dockerfile_instructions() if op == "CMD"]
    (entrypoint,) = [arg for op, arg in dockerfile_instructions() if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["petvit"] and petvit_args(json.loads(cmd)).port == SERVE_PORT
    # The smoke test places its artifact exactly where train --if-missing looks, so train skips.
    smoke = (ROOT / "scripts" / "compose-smoke.sh").read_text()
    exports = set(re.findall(r"compose run --rm train (export [^\\\n'`]*)", smoke))
    assert exports
    for export in exports:
        assert str(petvit_args(export.split()).out) == train.out


def test_the_cli_check_refuses_bad_command_lines(petvit_args):
    """Guards the test above: an unknown flag, a value outside the choices, a bad type, a missing subcommand."""
    for argv in (["train", "--recipe", "cpu"], ["train", "--if-mising"], ["serve", "--port", "http"], ["run"]):
        with pytest.raises(AssertionError):
            petvit_args(argv)


# `docker-compose config` on both file sets (with v1.29 and v2, and the flavour each selects) runs in
# scripts/compose-smoke.sh, where both composes are guaranteed: here it could only skip on a machine without them.


# ---- Dockerfile -------------------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_python_slim_and_runs_as_non_root():
    instructions = dockerfile_instructions()
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert len(froms) >= 2
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", DOCKERFILE, re.M)
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    runtime = instructions[[i for i, (op, _) in enumerate(instructions) if op == "FROM"][-1] :]
    users = [arg for op, arg in runtime if op == "USER"]
    assert users and users[-1] not in {"root", "0"}
    assert any(op == "COPY" and arg.startswith("--from=build") for op, arg in runtime)


def test_dockerfile_has_mirror_passthrough_torch_flavour_and_a_readiness_healthcheck():
    args = {arg.split("=")[0] for op, arg in dockerfile_instructions() if op == "ARG"}
    assert {"PIP_INDEX_URL", "PIP_FIND_LINKS", "TORCH_FLAVOR"} <= args
    # An empty PIP_INDEX_URL would break pip: mirrors stay unset unless passed.
    assert re.search(r"^ARG PIP_INDEX_URL$", DOCKERFILE, re.M) and re.search(r"^ARG PIP_FIND_LINKS$", DOCKERFILE, re.M)
    assert "-c constraints.txt" in DOCKERFILE
    (healthcheck,) = [arg for op, arg in dockerfile_instructions() if op == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{SERVE_PORT}/readyz" in healthcheck and "curl" not in healthcheck
    assert ("EXPOSE", str(SERVE_PORT)) in dockerfile_instructions()


def test_dockerfile_uses_no_buildkit_only_syntax():
    assert not re.search(r"^#\s*syntax=", DOCKERFILE, re.M)
    for op, arg in dockerfile_instructions():
        assert "--mount" not in arg and "<<" not in arg, f"{op} {arg[:40]}: BuildKit only"
        assert not (op in {"COPY", "ADD"} and re.search(r"--(link|parents|exclude|chmod)", arg))


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a directory pattern covers its contents."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern == "**" or any(
            fnmatch.fnmatch(candidate, pattern.replace("**/", "*"))
            for candidate in [path, *["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]]
        ):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_dockerfile_copies():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        src
        for op, arg in dockerfile_instructions()
        if op == "COPY" and not arg.startswith("--from")
        for src in arg.split()[:-1]
    ]
    assert copied and "tests" not in " ".join(copied)
    for src in copied:
        assert not _ignored(src, patterns), f"{src} is copied by the Dockerfile but excluded by .dockerignore"
        assert (ROOT / src).exists()
    for kept_out in (
        ".venv/bin/python",
        "data/oxford-iiit-pet",
        "artifacts/petvit.safetensors",
        "results/x.png",
        ".git/HEAD",
        "tests/conftest.py",
        "model/__pycache__/vit.cpython-311.pyc",
        "app/static/weights.safetensors",
    ):
        assert _ignored(kept_out, patterns), f"{kept_out} would be sent to the Docker daemon"


def test_readme_settings_table_lists_every_setting(setting_names):
    docs = (ROOT / "README.md").read_text()
    rows = set(re.findall(r"^\| `(PETVIT_[A-Z0-9_]+)` \|", docs, re.M))
    fields = setting_names
    assert not fields - rows, f"settings missing from the table: {sorted(fields - rows)}"
    assert not rows - fields, f"the table lists settings the service does not read: {sorted(rows - fields)}"
