"""Knowledge Service adapters: Redis records, S3 objects, the index."""
