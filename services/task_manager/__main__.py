"""`python -m services.task_manager`: run the Task Manager until SIGTERM."""

import sys

from services.common.entrypoint import run_service
from services.task_manager.app import build_app
from services.task_manager.settings import TaskManagerSettings

if __name__ == "__main__":
    sys.exit(run_service("task-manager", TaskManagerSettings, build_app))
