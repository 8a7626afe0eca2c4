"""The Knowledge Service: knowledge bases, documents, chunks, the ingestion
pipeline its workers run, and search."""
