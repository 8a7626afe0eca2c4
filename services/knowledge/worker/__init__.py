"""The knowledge worker: takes ingestion tasks from the Task Manager's worker
stream and runs them (runtime.py), with a pluggable task handler (handlers.py).

It runs inside the Knowledge Service (`worker.enabled`) and on its own as
`python -m services.knowledge.worker`, to scale workers independently.
"""
