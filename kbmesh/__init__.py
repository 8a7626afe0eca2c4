"""kbmesh: the API packages generated from protos/ (kbmesh.taskmanager.v1,
kbmesh.knowledge.v1; `make gen`)."""
