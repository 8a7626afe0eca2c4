"""`python -m services.knowledge`: run the Knowledge Service until SIGTERM."""

import sys

from services.common.entrypoint import run_service
from services.knowledge.app import build_app
from services.knowledge.settings import KnowledgeSettings

if __name__ == "__main__":
    sys.exit(run_service("knowledge", KnowledgeSettings, build_app))
