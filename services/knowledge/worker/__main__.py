"""`python -m services.knowledge.worker`: a knowledge worker on its own, until SIGTERM.

Settings are the Knowledge Service's (`KBMESH_KNOWLEDGE_...`): the Task
Manager address, `WORKER__TOKEN`, `WORKER__CONCURRENCY`, `WORKER__HANDLER`…
(`WORKER__ENABLED` does not apply: this process is the worker). It lowers its
own CPU priority by `WORKER__NICE` first (and its session's, if it leads one:
`process.lower_priority`). `--parent-pid PID` (given by a
Knowledge Service that runs its worker as a child process): drain and exit once
that process is gone. `--maintain`: also run the index maintenance passes
(`INDEX__OPTIMIZE_INTERVAL_SECONDS`), at this process's priority.
"""

import argparse
import asyncio
import logging
import sys

from services.common.connections import DependencyUnavailable
from services.common.logs import configure_logging
from services.knowledge.settings import KnowledgeSettings
from services.knowledge.worker.app import serve_worker
from services.knowledge.worker.process import lower_priority

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m services.knowledge.worker")
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--maintain", action="store_true", help="also run index maintenance")
    args = parser.parse_args()
    settings = KnowledgeSettings()
    priority = lower_priority(settings.worker.nice)
    configure_logging(settings.log, "knowledge-worker")
    log = logging.getLogger("services.knowledge.worker")
    for problem in priority.problems:
        log.warning(problem)
    log.info(
        "worker CPU priority",
        extra={"nice": priority.nice, "session_nice": priority.session_nice},
    )
    try:
        asyncio.run(serve_worker(settings, parent_pid=args.parent_pid, maintain=args.maintain))
    except DependencyUnavailable as exc:
        logging.getLogger(__name__).error("cannot start: %s", exc)
        sys.exit(1)
