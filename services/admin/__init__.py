"""Operator commands (`python -m services.admin --help`)."""
