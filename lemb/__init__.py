"""lemb: LLM-aware retrieval embedders trained from the LLM's own rank-aware rewards."""

__version__ = "0.1.0"
