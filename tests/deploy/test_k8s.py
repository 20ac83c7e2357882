"""Kubernetes manifests: schema-valid offline (kubernetes-validate's bundled schemas, strict), rendered per overlay,
and consistent with the app (probe paths are real routes, ports and paths line up) and with each other."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from app.config import Settings

# The oldest Kubernetes we claim (autoscaling/v2 and batch/v1 ttlSecondsAfterFinished are GA there) and the newest
# whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
SERVE_PORT = 8000


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", ["base", "cpu", "gpu"])
def test_every_rendered_resource_validates_against_the_kubernetes_schema(rendered, variant, version):
    docs = rendered[variant]
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "Job",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_a_misspelt_field(rendered, find_resource):
    """Guards the test above: a typo in a probe must not pass (strict mode refuses unknown fields)."""
    deployment = copy.deepcopy(find_resource(rendered["base"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {"path": "/readyz"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_probes_hit_real_routes_on_the_served_port(rendered, find_resource, app_routes, variant):
    deployment = find_resource(rendered[variant], "Deployment", "petvit-api")
    (api,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "api"]
    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert ports == {"http": SERVE_PORT}
    assert api["args"][api["args"].index("--port") + 1] == str(SERVE_PORT)
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = api[probe]["httpGet"]
        assert "GET" in app_routes[get["path"]], f"{probe} {get['path']} is not a GET route of the app"
        assert ports.get(get["port"], get["port"]) == SERVE_PORT
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == SERVE_PORT
    assert "GET" in app_routes[annotations["prometheus.io/path"]]


def test_service_selects_the_api_pods_and_targets_the_named_port(rendered, find_resource):
    docs = rendered["base"]
    deployment = find_resource(docs, "Deployment", "petvit-api")
    service = find_resource(docs, "Service", "petvit-api")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    train_pods = find_resource(docs, "Job", "petvit-train")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= train_pods.items(), "the Service must not route to training"


def test_hpa_scales_the_api_deployment(rendered, find_resource):
    for variant in ("cpu", "gpu"):
        hpa = find_resource(rendered[variant], "HorizontalPodAutoscaler", "petvit-api")
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", "petvit-api")
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        # Utilization targets need CPU requests on every container of the pod.
        pod = find_resource(rendered[variant], "Deployment", "petvit-api")["spec"]["template"]["spec"]
        assert all("cpu" in c["resources"]["requests"] for c in pod["containers"])


def test_training_job_writes_the_artifact_the_deployment_serves(rendered, find_resource):
    docs = rendered["base"]
    job_pod = find_resource(docs, "Job", "petvit-train")["spec"]["template"]["spec"]
    api_pod = find_resource(docs, "Deployment", "petvit-api")["spec"]["template"]["spec"]
    (train,) = job_pod["containers"]
    args = train["args"]
    assert args[0] == "train" and "--if-missing" in args
    out = args[args.index("--out") + 1]

    def claim_mounted_at(pod, container, path_prefix):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in container["volumeMounts"]:
            if path_prefix.startswith(mount["mountPath"].rstrip("/") + "/"):
                return volumes[mount["name"]]["persistentVolumeClaim"]["claimName"], mount.get("readOnly", False)
        raise AssertionError(f"{path_prefix} is on no mounted volume")

    (api,) = [c for c in api_pod["containers"] if c["name"] == "api"]
    checkpoint = {e["name"]: e.get("value") for e in api["env"]}["PETVIT_CHECKPOINT"]
    assert checkpoint == out
    job_claim, job_read_only = claim_mounted_at(job_pod, train, out)
    api_claim, api_read_only = claim_mounted_at(api_pod, api, checkpoint)
    assert job_claim == api_claim == find_resource(docs, "PersistentVolumeClaim", job_claim)["metadata"]["name"]
    assert not job_read_only and api_read_only
    (wait,) = api_pod["initContainers"]
    assert {e["name"]: e["value"] for e in wait["env"]}["PETVIT_CHECKPOINT"] == checkpoint
    model_dirs = Settings(model_dirs={e["name"]: e.get("value") for e in api["env"]}["PETVIT_MODEL_DIRS"]).model_dirs
    for folder in model_dirs:  # reloads may load from the artifacts claim, read-only, and from nothing else
        assert claim_mounted_at(api_pod, api, f"{folder}/x") == (api_claim, True)


def test_pods_run_as_the_images_non_root_user(rendered, find_resource):
    for kind, name in (("Deployment", "petvit-api"), ("Job", "petvit-train")):
        pod = find_resource(rendered["base"], kind, name)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the uid the Dockerfile creates


def test_api_env_names_are_settings_the_service_reads(rendered, find_resource, setting_names):
    fields = setting_names
    for variant in ("cpu", "gpu"):
        pod = find_resource(rendered[variant], "Deployment", "petvit-api")["spec"]["template"]["spec"]
        (api,) = [c for c in pod["containers"] if c["name"] == "api"]
        names = {e["name"] for e in api["env"] if e["name"].startswith("PETVIT_")}
        assert names <= fields, f"unknown settings {sorted(names - fields)}"
        Settings(**{e["name"].removeprefix("PETVIT_").lower(): e["value"] for e in api["env"] if "value" in e})


def test_gpu_overlay_asks_for_a_gpu_and_serves_on_cuda(rendered, find_resource):
    for variant, wants_gpu in (("cpu", False), ("gpu", True)):
        api_pod = find_resource(rendered[variant], "Deployment", "petvit-api")["spec"]["template"]["spec"]
        job_pod = find_resource(rendered[variant], "Job", "petvit-train")["spec"]["template"]["spec"]
        (api,) = [c for c in api_pod["containers"] if c["name"] == "api"]
        device = {e["name"]: e.get("value") for e in api["env"]}["PETVIT_DEVICE"]
        assert device == ("cuda" if wants_gpu else "cpu")
        for container in (api, job_pod["containers"][0]):
            assert ("nvidia.com/gpu" in container["resources"].get("limits", {})) == wants_gpu
        images = {
            c["image"] for pod in (api_pod, job_pod) for c in [*pod.get("initContainers", []), *pod["containers"]]
        }
        assert images == {f"petvit:{'cuda' if wants_gpu else 'cpu'}"}


def test_json_patch_test_op_refuses_a_shifted_index(json_patch):
    doc = {"env": [{"name": "A", "value": "1"}]}
    assert json_patch(doc, [{"op": "replace", "path": "/env/0/value", "value": "2"}])["env"][0]["value"] == "2"
    with pytest.raises(AssertionError):
        json_patch(doc, [{"op": "test", "path": "/env/0/name", "value": "B"}])


def test_the_hpa_alone_owns_the_replica_count(rendered, find_resource):
    """A `replicas` field would reset the autoscaled count on every `kubectl apply`."""
    for variant in ("cpu", "gpu"):
        assert "replicas" not in find_resource(rendered[variant], "Deployment", "petvit-api")["spec"]


def test_container_args_are_command_lines_petvit_accepts(rendered, find_resource, petvit_args):
    """The Deployment's and the Job's args go through the real CLI parser: flags exist, values are in their choices."""
    for variant in ("cpu", "gpu"):
        docs = rendered[variant]
        (api,) = [
            c
            for c in find_resource(docs, "Deployment", "petvit-api")["spec"]["template"]["spec"]["containers"]
            if c["name"] == "api"
        ]
        serve = petvit_args(api["args"])
        assert (serve.host, serve.port) == ("0.0.0.0", SERVE_PORT)
        (train,) = find_resource(docs, "Job", "petvit-train")["spec"]["template"]["spec"]["containers"]
        job = petvit_args(train["args"])
        checkpoint = {e["name"]: e.get("value") for e in api["env"]}["PETVIT_CHECKPOINT"]
        assert job.if_missing and job.out == checkpoint and job.recipe == "auto"


def api_pod_spec(docs, find_resource) -> dict:
    return find_resource(docs, "Deployment", "petvit-api")["spec"]["template"]["spec"]


def test_a_rollout_never_takes_a_serving_pod_away_first(rendered, find_resource):
    for variant in ("cpu", "gpu"):
        strategy = find_resource(rendered[variant], "Deployment", "petvit-api")["spec"]["strategy"]
        assert strategy["type"] == "RollingUpdate"
        assert strategy["rollingUpdate"]["maxUnavailable"] == 0 and strategy["rollingUpdate"]["maxSurge"] >= 1


def test_pre_stop_pauses_before_sigterm_within_the_grace_period(rendered, find_resource, monkeypatch):
    """The hook is `python -c CODE` (the image has no `sleep` to count on; the hook's `sleep` action needs 1.30):
    CODE must sleep a few seconds, and the pause plus the service's drain (it waits for in-flight requests up to
    PETVIT_REQUEST_TIMEOUT_S) must fit in terminationGracePeriodSeconds, or the kubelet kills mid-request.
    scripts/compose-smoke.sh runs the same command in the image."""
    import time

    pod = api_pod_spec(rendered["base"], find_resource)
    (api,) = [c for c in pod["containers"] if c["name"] == "api"]
    program, flag, code = api["lifecycle"]["preStop"]["exec"]["command"]
    assert (program, flag) == ("python", "-c")
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    exec(compile(code, "preStop", "exec"), {})
    (pause,) = slept
    assert 2 <= pause <= 15
    env = {e["name"]: e.get("value") for e in api["env"]}
    drain = float(env.get("PETVIT_REQUEST_TIMEOUT_S") or Settings().request_timeout_s)
    assert pause + drain < pod["terminationGracePeriodSeconds"]


def test_the_disruption_budget_covers_the_api_pods_only_and_lets_drains_proceed(rendered, find_resource):
    for variant in ("cpu", "gpu"):
        docs = rendered[variant]
        pdb = find_resource(docs, "PodDisruptionBudget", "petvit-api")
        selector = pdb["spec"]["selector"]["matchLabels"]
        api_labels = find_resource(docs, "Deployment", "petvit-api")["spec"]["template"]["metadata"]["labels"]
        train_labels = find_resource(docs, "Job", "petvit-train")["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= api_labels.items() and not selector.items() <= train_labels.items()
        # At the HPA's minimum, one pod may still be evicted (a budget of 0 blocks node drains for good) ...
        min_replicas = find_resource(docs, "HorizontalPodAutoscaler", "petvit-api")["spec"]["minReplicas"]
        spec = pdb["spec"]
        allowed = spec["maxUnavailable"] if "maxUnavailable" in spec else min_replicas - spec["minAvailable"]
        assert allowed >= 1, f"{variant}: the budget allows no eviction at {min_replicas} replica(s)"
        # ... but never more than one at a time where there are two or more.
        assert allowed == 1
        assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # a pod that isn't ready protects nothing


def test_replicas_spread_across_nodes_and_zones(rendered, find_resource):
    for variant in ("cpu", "gpu"):
        pod_template = find_resource(rendered[variant], "Deployment", "petvit-api")["spec"]["template"]
        constraints = pod_template["spec"]["topologySpreadConstraints"]
        keys = {c["topologyKey"] for c in constraints}
        assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for constraint in constraints:
            assert constraint["labelSelector"]["matchLabels"].items() <= pod_template["metadata"]["labels"].items()
            assert constraint["maxSkew"] == 1
            # Soft: a replica Pending for want of another node is worse than two replicas on one node.
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
            assert constraint["matchLabelKeys"] == ["pod-template-hash"]  # each rollout spreads on its own
