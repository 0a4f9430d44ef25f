"""narthex.loadtests: Locust user classes per real user, provisioning, the SLA checker."""
