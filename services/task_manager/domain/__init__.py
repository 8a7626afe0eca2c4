"""Task Manager domain logic: no gRPC, Redis or S3 imports here. Adapters
implement the ports in `ports.py`; unit tests use in-memory fakes."""
