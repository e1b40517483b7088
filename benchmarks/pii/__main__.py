"""python -m benchmarks.pii [options]"""
from .command import pii_app

pii_app()
