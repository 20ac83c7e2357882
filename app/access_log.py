"""uvicorn's access log without the noise: health probes and Prometheus scrapes are not logged at INFO.

A kubelet probing /healthz and /readyz every few seconds and Prometheus scraping /metrics every 15 s would otherwise
fill the log with lines that say nothing; a failed probe (4xx/5xx) is still logged, and PETVIT_LOG_LEVEL=debug
logs them all.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from uvicorn.config import LOGGING_CONFIG

PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class QuietProbes(logging.Filter):
    """Drops uvicorn.access records of successful GETs to PROBE_PATHS unless `keep` is set."""

    def __init__(self, keep: bool = False) -> None:
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn formats access lines from args = (client_addr, method, full_path, http_version, status_code).
        args = record.args
        if self.keep or not isinstance(args, tuple) or len(args) != 5:
            return True
        _, method, full_path, _, status = args
        path = str(full_path).split("?", 1)[0]
        return not (method == "GET" and path in PROBE_PATHS and int(str(status)) < 400)


def uvicorn_log_config(log_level: str) -> dict[str, Any]:
    """uvicorn's own logging config with QuietProbes on its access handler (probes kept at debug level)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["quiet_probes"] = {"()": QuietProbes, "keep": log_level.lower() == "debug"}
    config["handlers"]["access"].setdefault("filters", []).append("quiet_probes")
    return config
