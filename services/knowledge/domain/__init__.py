"""Knowledge Service domain logic: no gRPC, Redis or S3 imports here."""
