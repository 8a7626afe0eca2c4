"""`python -m services.admin keys create|list|revoke`: API keys of tenants.

Talks to Redis directly (the one the services use): `--redis-url`, else
`KBMESH_REDIS_URL`, else the services' default. A created key is printed once
and never stored: only its SHA-256 is kept. Revoking takes effect at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime

from redis.asyncio import Redis

from services.common.auth import ApiKeys
from services.common.settings import RedisSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.admin", description=__doc__)
    parser.add_argument("--redis-url", default=None, help="Redis URL (env KBMESH_REDIS_URL)")
    groups = parser.add_subparsers(dest="group", required=True)
    keys = groups.add_parser("keys", help="API keys of tenants")
    commands = keys.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="issue a key (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="", help="what the key is for")
    listing = commands.add_parser("list", help="keys (ids, tenants, names; never secrets)")
    listing.add_argument("--tenant", default=None)
    revoke = commands.add_parser("revoke", help="revoke a key by id (effective at once)")
    revoke.add_argument("id")
    return parser


async def _run(args: argparse.Namespace) -> int:
    url = args.redis_url or os.environ.get("KBMESH_REDIS_URL")
    url = url or RedisSettings().url.get_secret_value()
    redis = Redis.from_url(url)
    try:
        keys = ApiKeys(redis)
        if args.command == "create":
            try:
                record, key = await keys.create(args.tenant, args.name)
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(f"# key id {record.id} for tenant {record.tenant} (shown once):", file=sys.stderr)
            print(key)
            return 0
        if args.command == "list":
            for k in await keys.list(args.tenant):
                created = datetime.fromtimestamp(k.create_time_ms / 1000, UTC)
                print(f"{k.id}\t{k.tenant}\t{created:%Y-%m-%dT%H:%M:%SZ}\t{k.name}")
            return 0
        if await keys.revoke(args.id.lower()):
            print(f"revoked {args.id}")
            return 0
        print(f"error: no key with id {args.id}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_run(_parser().parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
