"""Prefect tasks: thin wrappers over the ML core, DB and registry. They pass paths, ids and hashes only."""
