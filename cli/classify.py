"""`petvit classify --url URL IMAGE...`: send local images to a running service (app/client.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--url", default="http://localhost:8000", help="service base URL (default localhost:8000)")
    parser.add_argument("--top-k", type=int, default=None, help="breeds per image (default: the service's)")
    parser.add_argument("--api-key", default=None, help="sent as X-API-Key when the service wants one")
    parser.add_argument("--json", action="store_true", help="print the service's JSON answer")


def main(args: argparse.Namespace) -> int:
    import httpx

    from app.client import PetvitClient, PetvitError

    try:
        with PetvitClient(args.url, api_key=args.api_key) as client:
            answer = client.classify(args.images, top_k=args.top_k)
    except PetvitError as err:
        print(f"petvit classify: the service answered {err}")
        return 1
    except (httpx.HTTPError, OSError) as err:
        print(f"petvit classify: could not reach {args.url}: {err}")
        return 2
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    for path, result in zip(args.images, answer["results"], strict=True):
        print(path)
        for p in result["predictions"]:
            print(f"  {p['score']:7.2%}  {p['label']} ({p['species']})")
    return 0
