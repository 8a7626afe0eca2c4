"""Developer tooling: code generation and the local stack of real servers.

Used by the Makefile (`make gen`, `make up`, `make down`) and by the test
fixtures, so tests start servers exactly the way users do.
"""
