"""The Ray Jobs entrypoint of a scheduled crawl: a thin wrapper over `zoospectra.crawl`.

    python -m zoospectra.jobs.entrypoint --spec jobs/nightly-example.yaml

Exit 0 when the crawl completed (also with `errors` rows: a scheduled job does not fail because
one repo is bad), 2 for an invalid spec, 1 when the Hub or the results root cannot be reached;
every error is one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import asdict

from zoospectra.api import crawl
from zoospectra.errors import ZoospectraError

from .spec import CrawlSpec


def build_parser() -> argparse.ArgumentParser:
    """The entrypoint's command line (the deploy manifests' commands are checked against it)."""
    parser = argparse.ArgumentParser(prog="python -m zoospectra.jobs.entrypoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", required=True, help="YAML crawl spec (see jobs/nightly-example.yaml)")
    parser.add_argument("--local", action="store_true", help="run units in-process (debugging)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        spec = CrawlSpec.load(args.spec)
    except ZoospectraError as err:
        print(f"invalid job spec: {err}", file=sys.stderr)
        return 2
    command = shlex.join([sys.executable, "-m", "zoospectra.jobs.entrypoint", *(argv or sys.argv[1:])])
    try:
        summary = crawl(spec, executor="local" if args.local else "ray", command=command)
    except ZoospectraError as err:  # e.g. the Hub endpoint cannot be reached: one line, no traceback
        print(f"error ({err.kind}): {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the results root cannot be written
        print(f"error (os): {err}", file=sys.stderr)
        return 1
    print(json.dumps({"name": summary.name, "bases": [asdict(b) for b in summary.bases]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
