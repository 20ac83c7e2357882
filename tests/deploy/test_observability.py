"""Prometheus config, alert rules and the Grafana dashboard: they parse, and every metric and label they query is
one the app exports (app.metrics.Metrics), so a renamed metric breaks this test, not a dashboard at 3 a.m."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "petvit.json"


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def container_path_to_host(service: str, container_path: str) -> Path:
    """Where a path inside a compose service comes from on the host (its bind mounts)."""
    for volume in compose()["services"][service]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./") and (container_path == target or container_path.startswith(target + "/")):
            return ROOT / source / container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is not bind-mounted into {service}")


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for rule in group["rules"]]


def dashboard_targets() -> list[tuple[str, dict]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target) for panel in dashboard["panels"] for target in panel.get("targets", [])]


# ---- Prometheus -------------------------------------------------------------------------------------------------


def test_prometheus_scrapes_the_compose_api_service_on_its_port():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "petvit-api"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    services = compose()["services"]
    assert host in services and host == "api"
    # "${PETVIT_PORT:-8000}:8000": whatever the host port, the container port is the one scraped.
    assert services["api"]["ports"][0].rsplit(":", 1)[1] == port
    assert services["api"]["command"][services["api"]["command"].index("--port") + 1] == port


def test_rule_files_named_in_the_config_exist_where_compose_mounts_them():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    command = compose()["services"]["prometheus"]["command"]
    (config_flag,) = [c for c in command if c.startswith("--config.file=")]
    assert container_path_to_host("prometheus", config_flag.split("=", 1)[1]) == PROM / "prometheus.yml"
    assert config["rule_files"]
    for rule_file in config["rule_files"]:
        assert container_path_to_host("prometheus", rule_file).is_file()


def test_alert_rules_cover_errors_latency_saturation_and_readiness():
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    assert names >= {
        "PetvitDown",
        "PetvitHighErrorRate",
        "PetvitHighLatencyP99",
        "PetvitQueueSaturated",
        "PetvitNotReady",
    }
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_alert_rules_query_only_series_and_labels_the_app_exports(check_expr):
    for rule in alert_rules():
        if rule["alert"] == "PetvitDown":
            assert rule["expr"].startswith('up{job="petvit-api"}')
            continue
        check_expr(rule["expr"], f"alert {rule['alert']}")


def test_label_values_matched_in_rules_and_dashboard_are_emitted_by_the_app(selectors, app_routes):
    """route="/classify" must be a route template the app labels with; reason="queue_full" one the rejection counter
    counts (not merely a string somewhere in app/: "queue_full" is also an error code); status a 3-digit code."""
    from app.metrics import REJECTION_REASONS, Metrics

    reasons = {
        "petvit_rejected_total": {
            *REJECTION_REASONS,
            "unauthorized",  # app/deps.py, the API-key check
        },
        "petvit_batch_flush_total": {
            sample.labels["reason"] for family in Metrics().batch_flush.collect() for sample in family.samples
        },
    }
    assert 'labels("unauthorized")' in (ROOT / "app" / "deps.py").read_text()
    exprs = [rule["expr"] for rule in alert_rules()] + [target["expr"] for _, target in dashboard_targets()]
    seen = 0
    for expr in exprs:
        for name, matchers in selectors(expr):
            for label, (op, value) in matchers.items():
                if op != "=":
                    continue
                seen += 1
                if label == "route":
                    assert value in app_routes, f"no route {value}"
                elif label == "reason":
                    assert value in reasons[name], f"{name} is never counted with reason={value}"
                elif label == "status":
                    assert re.fullmatch(r"[1-5]\d\d", value), f"status={value} is not an HTTP status code"
    assert seen >= 3


def test_selector_parser_reads_names_and_matchers(selectors):
    parsed = selectors('sum(rate(petvit_requests_total{route="/classify", status=~"5.."}[5m])) / petvit_queue_depth')
    assert parsed == [
        ("petvit_requests_total", {"route": ("=", "/classify"), "status": ("=~", "5..")}),
        ("petvit_queue_depth", {}),
    ]


def test_metric_check_rejects_an_unknown_metric_or_label(check_expr):
    with pytest.raises(AssertionError):
        check_expr("rate(petvit_request_total[5m])", "typo")  # requests, not request
    with pytest.raises(AssertionError):
        check_expr('petvit_queue_depth{route="/classify"}', "label the gauge does not have")


# promtool's config check and the alert unit tests (alerts.test.yml) run in scripts/compose-smoke.sh, inside the
# Prometheus image, where promtool is guaranteed to exist.


# ---- Grafana ----------------------------------------------------------------------------------------------------


def test_dashboard_panels_query_only_series_the_app_exports(check_expr):
    targets = dashboard_targets()
    assert len(targets) >= 10
    for title, target in targets:
        check_expr(target["expr"], f"panel {title!r}")


def test_dashboard_has_the_panels_the_issue_asks_for():
    dashboard = json.loads(DASHBOARD.read_text())
    exprs_by_title = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dashboard["panels"]}
    wanted = {
        "requests by status": r"by \(route, status\) \(rate\(petvit_requests_total",
        "latency quantiles": r"histogram_quantile\(0\.5,.*histogram_quantile\(0\.95,.*histogram_quantile\(0\.99,",
        "batch size distribution": r"petvit_batch_size_bucket",
        "queue depth": r"petvit_queue_depth",
        "queue wait": r"petvit_queue_wait_seconds_bucket",
        "flush reasons": r"petvit_batch_flush_total.*by \(reason\)|by \(reason\).*petvit_batch_flush_total",
        "rejections": r"petvit_rejected_total",
        "GPU memory": r"petvit_gpu_memory_allocated_bytes",
    }
    for what, pattern in wanted.items():
        assert any(re.search(pattern, e) for e in exprs_by_title.values()), f"no panel for {what}"


def test_dashboard_layout_and_datasource_are_consistent():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (ds,) = datasource["datasources"]
    assert ds["url"] == "http://prometheus:9090" and "prometheus" in compose()["services"]
    uids = {p["datasource"]["uid"] for p in panels} | {t["datasource"]["uid"] for _, t in dashboard_targets()}
    assert uids == {ds["uid"]}


def test_grafana_provisioning_points_at_the_mounted_dashboard_folder():
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "petvit.yml").read_text())
    (entry,) = provider["providers"]
    folder = container_path_to_host("grafana", entry["options"]["path"])
    assert (folder / DASHBOARD.name).is_file()
    assert container_path_to_host("grafana", "/etc/grafana/provisioning/datasources/prometheus.yml").is_file()
    home = compose()["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert container_path_to_host("grafana", home) == DASHBOARD
