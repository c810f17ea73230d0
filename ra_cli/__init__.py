"""ra: chat with long documents using RetrievalAttention (Liu et al., arXiv 2409.10516)."""

__version__ = "0.1.0"
