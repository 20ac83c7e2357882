"""Health probes and Prometheus scrapes stay out of the INFO access log; everything else, and failures, stay in."""

from __future__ import annotations

import logging
import logging.config

import pytest

from app.access_log import QuietProbes, uvicorn_log_config


def access_record(method: str, path: str, status: int) -> logging.LogRecord:
    # The shape uvicorn gives its access records: '%s - "%s %s HTTP/%s" %d'.
    args = ("127.0.0.1:5000", method, path, "1.1", status)
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d', args, None)


@pytest.mark.parametrize(
    ("method", "path", "status", "logged"),
    [
        ("GET", "/healthz", 200, False),
        ("GET", "/readyz", 200, False),
        ("GET", "/metrics", 200, False),
        ("GET", "/metrics?name[]=petvit_requests_total", 200, False),
        ("GET", "/readyz", 503, True),  # a failing probe is news
        ("POST", "/classify", 200, True),
        ("GET", "/v1/model", 200, True),
        ("GET", "/", 200, True),
    ],
)
def test_probes_and_scrapes_are_dropped_at_info(method, path, status, logged):
    assert QuietProbes().filter(access_record(method, path, status)) is logged
    assert QuietProbes(keep=True).filter(access_record(method, path, status)) is True  # debug level keeps all


def test_serve_installs_the_filter_on_uvicorns_access_handler(capsys):
    config = uvicorn_log_config("info")
    config["handlers"]["access"]["stream"] = "ext://sys.stdout"
    # The same handlers and filters on loggers of the test's own, so uvicorn's real loggers stay untouched.
    config["loggers"] = {f"quiet-test.{name}": spec for name, spec in config["loggers"].items()}
    config["disable_existing_loggers"] = False
    logging.config.dictConfig(config)
    access = logging.getLogger("quiet-test.uvicorn.access")
    for method, path, status in [("GET", "/healthz", 200), ("POST", "/classify", 200), ("GET", "/readyz", 503)]:
        access.handle(access_record(method, path, status))
    printed = capsys.readouterr().out
    assert "/classify" in printed and "/readyz" in printed and "503" in printed
    assert "/healthz" not in printed
    assert uvicorn_log_config("debug")["filters"]["quiet_probes"]["keep"] is True
