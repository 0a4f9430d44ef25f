"""One tenant's flood must not take inference away from another (issue 10), with real
processes (`tests.support.flood`): auth, inference serving minilm, a gateway in front.

A tenant on a large plan floods with 40 clients sending 100-text embedding requests back to
back; a quiet tenant sends one small request every 200 ms. Only errors are asserted, never
latencies (`bench/fairness.py` prints those): the quiet tenant gets none, the flooder gets
its share of the model and 503s with Retry-After for the rest.

- At inference: its queue is fair across tenants (fair-share admission, deficit round
  robin batches).
- Through the gateway: also needs the gateway to pass inference's backpressure (503 with
  Retry-After) through rather than count it as a breaker failure, which would open the
  breaker for every tenant: issue 10's gateway work. Until that is merged this variant is
  an expected failure (strict: it reports when it starts passing, so that the marker goes).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.flood import FloodStack, flood, flood_stack

pytestmark = pytest.mark.slow

FLOOD_SECONDS = 6.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FloodStack]:
    with flood_stack(tmp_path_factory.mktemp("fairness")) as started:
        yield started


async def test_a_flood_leaves_another_tenant_served_at_inference(stack: FloodStack) -> None:
    quiet, flooder = await flood(stack, FLOOD_SECONDS, through_gateway=False)
    assert quiet.failed == 0, quiet.errors
    assert quiet.served >= FLOOD_SECONDS / 0.2 / 2  # it was really sending all along
    # The flooder is served (the model is not idle for it) and is the one refused.
    assert flooder.served > 0
    assert flooder.statuses[503] > 0, flooder.statuses
    assert set(flooder.statuses) == {200, 503}, flooder.errors
    assert flooder.without_retry_after == 0
    assert flooder.transport_errors == 0, flooder.errors


async def test_a_flood_leaves_another_tenant_served_through_the_gateway(
    stack: FloodStack,
) -> None:
    quiet, flooder = await flood(stack, FLOOD_SECONDS, through_gateway=True)
    assert quiet.failed == 0, quiet.errors
    assert quiet.served >= FLOOD_SECONDS / 0.2 / 2
    assert flooder.served > 0
    assert flooder.without_retry_after == 0
    assert flooder.transport_errors == 0, flooder.errors
