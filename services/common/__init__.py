"""Code both services share: settings, logging, errors, the gRPC server host."""
