"""`python -m services.knowledge.worker`: a knowledge worker on its own, until SIGTERM.

Settings are the Knowledge Service's (`KBMESH_KNOWLEDGE_...`): the Task
Manager address, `WORKER__TOKEN`, `WORKER__CONCURRENCY`, `WORKER__HANDLER`…
(`WORKER__ENABLED` does not apply: this process is the worker).
"""

import asyncio
import logging
import sys

from services.common.connections import DependencyUnavailable
from services.common.logs import configure_logging
from services.knowledge.settings import KnowledgeSettings
from services.knowledge.worker.app import serve_worker

if __name__ == "__main__":
    settings = KnowledgeSettings()
    configure_logging(settings.log, "knowledge-worker")
    try:
        asyncio.run(serve_worker(settings))
    except DependencyUnavailable as exc:
        logging.getLogger(__name__).error("cannot start: %s", exc)
        sys.exit(1)
