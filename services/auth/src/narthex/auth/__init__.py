"""narthex.auth: Tenants, plans, API keys, JWT issuing and JWKS."""
