"""Adapters of the Task Manager: the domain's ports implemented on real servers.

`redis_store.RedisTaskStore` keeps tasks, documents, the queue and task events
in Redis; the S3 adapter stores uploaded objects.
"""
