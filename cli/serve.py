"""`petvit serve`: the HTTP service under uvicorn, one worker per process.

One worker because the model is the bottleneck and it already uses every core (CPU) or the whole GPU: a second
worker would load a second copy of the weights and split the cores between two half-sized batch streams. Scale out
with more processes/pods behind a load balancer instead, each with its own batcher.
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="interface to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from app.config import settings_or_report

    settings = settings_or_report("petvit serve")
    if settings is None:
        return 2
    from app.access_log import uvicorn_log_config
    from app.main import create_app  # only after the settings check: importing it loads torch

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        workers=1,
        log_level=settings.log_level.lower(),
        log_config=uvicorn_log_config(settings.log_level),  # probes and scrapes are not logged at INFO
        timeout_graceful_shutdown=max(5, int(settings.request_timeout_s) + 5),  # let queued work finish
    )
    return 0
