"""Model-level canaries: a traffic split between loaded versions of one model, chosen per request.

A split is a set of integer weights summing to 100, one per version (as KServe's canary
percentage, generalised to any number of versions). A request that pins a version never
comes here. One that carries a key (`KEY_HEADER`, say a user id) goes where the key hashes:
the same key lands on the same version for as long as the weights stand, and as a canary's
share grows the keys already on it stay there (versions own consecutive ranges of the 100
buckets, in version order). Any other request is dealt by smooth weighted round robin
(nginx's), so proportions are exact rather than random: at 90/10 every run of 10 requests
has exactly one on the canary.

The round robin is kept per tenant: each tenant's own traffic is split exactly, and no
tenant's volume or timing decides which version another tenant's requests reach.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Mapping

__all__ = ["KEY_HEADER", "KEY_MAX_LENGTH", "TOTAL", "Split", "check_weights"]

# The request header whose value keeps a caller on one version (hashed, never stored).
KEY_HEADER = "x-narthex-canary-key"
KEY_MAX_LENGTH = 256
TOTAL = 100
# Round-robin positions kept per split; a tenant forgotten past this starts a fresh cycle,
# which keeps its proportions exact over whole cycles all the same.
_MAX_TENANTS = 4096


def check_weights(weights: Mapping[int, int], versions: Iterable[int] | None = None) -> None:
    """ValueError, saying what is wrong, unless `weights` is a valid split (of `versions`,
    when given: the versions that may take traffic)."""
    if not weights:
        raise ValueError("name at least one version and its weight")
    for version, weight in weights.items():
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"version {version!r} is not a version number")
        if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
            raise ValueError(f"v{version}: weight {weight!r} is not a non-negative integer")
    total = sum(weights.values())
    if total != TOTAL:
        raise ValueError(f"weights sum to {total}, not {TOTAL}")
    if versions is not None:
        known = set(versions)
        unknown = sorted(set(weights) - known)
        if unknown:
            loaded = ", ".join(f"v{v}" for v in sorted(known)) or "none"
            raise ValueError(
                f"{', '.join(f'v{v}' for v in unknown)} not loaded (loaded: {loaded});"
                " load a version before giving it traffic"
            )


class Split:
    """Valid weights (see `check_weights`) and the choice of a version per request."""

    def __init__(self, model: str, weights: Mapping[int, int]) -> None:
        check_weights(weights)
        self.model = model
        self.weights: dict[int, int] = dict(sorted(weights.items()))
        taking = [(v, w) for v, w in self.weights.items() if w > 0]
        self._versions = [v for v, _ in taking]
        self._shares = [w for _, w in taking]
        self._bounds = list(itertools.accumulate(self._shares))
        self._salt = model.encode() + b"\0"
        self._positions: OrderedDict[str, list[int]] = OrderedDict()

    def choose(self, tenant: str, key: str | None = None) -> int:
        if len(self._versions) == 1:
            return self._versions[0]
        if key is not None:
            return self.sticky(key)
        return self._next(tenant)

    def sticky(self, key: str) -> int:
        """The version `key` hashes to: fixed while the weights are."""
        digest = hashlib.blake2b(self._salt + key.encode(), digest_size=8).digest()
        bucket = int.from_bytes(digest, "big") % TOTAL
        for version, bound in zip(self._versions, self._bounds, strict=True):
            if bucket < bound:
                return version
        raise AssertionError("the weights sum to 100")

    def _next(self, tenant: str) -> int:
        current = self._positions.get(tenant)
        if current is None:
            current = [0] * len(self._shares)
            self._positions[tenant] = current
            if len(self._positions) > _MAX_TENANTS:
                self._positions.popitem(last=False)
        else:
            self._positions.move_to_end(tenant)
        best = 0
        for index, share in enumerate(self._shares):
            current[index] += share
            if current[index] > current[best]:
                best = index
        current[best] -= TOTAL
        return self._versions[best]
