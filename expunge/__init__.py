"""expunge: compliance requests in, unlearned + evaluated + registered + audited LLMs out."""
__version__ = "0.1.0"
