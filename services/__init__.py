"""kbmesh services: the Task Manager, the Knowledge Service and their shared code."""
