"""narthex.analytics: Usage and prediction aggregates, drift."""
