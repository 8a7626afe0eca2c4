"""The ingestion pipeline: S3 object → sniff → parse → chunk → embed → index.

Modules: `sniff` (type from content), `zipguard` (OOXML bomb check), `parsers`
(one per format, to `Section`s), `chunking` (llama-index node parsers),
`embedding` (local ONNX MiniLM) and `openai_embedding` (remote), `query_embedding`
(search queries with the knowledge base's own model), `pipeline`
(the worker's `IngestHandler`), `errors` (why a document is refused).
"""
