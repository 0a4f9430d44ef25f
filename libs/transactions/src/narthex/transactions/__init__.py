"""narthex.transactions: the transaction simulator and per-account aggregates (offline and online)."""
