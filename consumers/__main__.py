"""python -m consumers {sdxl,wan,chat} [--burst] | dashboard [--port N] | cancel JOB_ID"""
from __future__ import annotations

import argparse
import logging
import sys

from .families import FAMILIES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m consumers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in FAMILIES:
        p = sub.add_parser(name, help=f"run the {name} daemon on {FAMILIES[name].raw_queue}")
        p.add_argument("--burst", action="store_true", help="drain the queue, then exit")
        p.add_argument("--log-level", default="INFO")
    dash = sub.add_parser("dashboard", help="rq-dashboard 0.9, patched for genq's JSON jobs")
    dash.add_argument("--port", type=int, default=9181)
    dash.add_argument("--bind", default="127.0.0.1")
    cancel = sub.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    args = parser.parse_args(argv)

    from schemas.settings import get_settings

    settings = get_settings()
    if args.command == "dashboard":
        from .dashboard import serve

        return serve(settings, args.bind, args.port)
    if args.command == "cancel":
        from .cancel import request_cancel
        from .daemon import connect

        request_cancel(connect(settings), args.job_id)
        print(f"cancel requested for {args.job_id}")
        return 0
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .daemon import run

    return run(args.command, settings, burst=args.burst, log_level=args.log_level)


if __name__ == "__main__":
    sys.exit(main())
