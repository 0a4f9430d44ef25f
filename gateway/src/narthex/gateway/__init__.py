"""narthex.gateway: the public edge: authentication, rate limits, quotas and routing."""
