"""Rate limits at the gateway: tenant buckets and quotas, plans, edge policy, per-IP guard."""
