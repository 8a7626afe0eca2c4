"""``python -m devstack up|down|run|status``: the local kbmesh stack.

See devstack/stack.py for what each command does and the environment
variables (ports, state directory) it reads.
"""

from __future__ import annotations

import argparse
import os
import sys

from devstack import stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack",
        description="Run the kbmesh developer stack: Redis, SeaweedFS (S3), "
        "Task Manager, Knowledge Service and Envoy.",
        epilog="Ports and the state directory come from KBMESH_* environment variables "
        "(see `python -m pydoc devstack.stack`).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("up", help="start the stack in the background and wait until healthy")
    down = commands.add_parser("down", help="stop everything `up`/`run` started")
    down.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds each server gets after SIGTERM before SIGKILL (default: 10, SeaweedFS 25)",
    )
    commands.add_parser("run", help="start the stack in the foreground; Ctrl-C stops it")
    commands.add_parser("status", help="show each part and whether it is healthy")
    args = parser.parse_args(argv)

    config = stack.StackConfig.from_env()
    if args.command == "up":
        return stack.up(config)
    if args.command == "down":
        return stack.down(config, timeout=args.timeout)
    if args.command == "run":
        return stack.run(config)
    return stack.status(config)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `python -m devstack status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
