"""Run narthex services as real processes on free loopback ports: `narthex.testing.processes`,
under the names tests have always imported from here."""

from __future__ import annotations

from narthex.testing.processes import (
    Service,
    free_port,
    free_port_base,
    port_free,
    run_service,
    wait_ready,
)

__all__ = ["Service", "free_port", "free_port_base", "port_free", "run_service", "wait_ready"]
