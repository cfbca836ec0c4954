"""Low-rank factorisation: the arithmetic (``factors``), layers and ranks (``layers``), the pass (``low_rank``)."""
