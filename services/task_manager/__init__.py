"""The Task Manager: streaming uploads into S3, the durable task queue in Redis,
dispatch to knowledge workers, task state and progress."""
