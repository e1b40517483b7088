"""Prefect flows: the request lifecycle, and bootstrapping the embedded sample model."""
