"""Who is calling: a verified JWT, or an API key exchanged for one at the auth service, cached."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from starlette.types import Scope

from narthex.common.apikeys import cache_key, looks_like_api_key
from narthex.common.authn import MissingToken
from narthex.common.errors import InvalidCredentials, ServiceUnavailable
from narthex.common.http import ServiceClient, UpstreamError
from narthex.common.tokens import InvalidToken, Principal, TokenVerifier
from narthex.gateway.errors import KeyInQuery
from narthex.gateway.ratelimit.guard import ClientGuard
from narthex.gateway.revocations import Revocations
from narthex.gateway.routing import TOKEN_EXCHANGE
from narthex.gateway.singleflight import SingleFlight

# Query parameters that carry credentials in other APIs; refused here whatever their value.
_CREDENTIAL_PARAMS = (b"api_key=", b"apikey=", b"api-key=", b"access_token=", b"key=nx_")


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal | None  # None: the key was refused (cached briefly)
    fresh_until: float  # monotonic


class _KeyCache:
    """Exchanged keys by hash, bounded in all and per tenant, oldest exchange out first.

    Only keys the auth service accepted get in, and a tenant holds at most
    `per_tenant` of them: one tenant minting keys by the thousand pushes out its own
    entries, never another tenant's.
    """

    def __init__(self, total: int, per_tenant: int) -> None:
        self.total = total
        self.per_tenant = per_tenant
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._by_tenant: dict[str, OrderedDict[str, None]] = {}

    def get(self, digest: str) -> _Entry | None:
        return self._entries.get(digest)

    def put(self, digest: str, entry: _Entry) -> None:
        assert entry.principal is not None
        self.discard(digest)
        tenant = entry.principal.tenant
        self._entries[digest] = entry
        keys = self._by_tenant.setdefault(tenant, OrderedDict())
        keys[digest] = None
        if len(keys) > self.per_tenant:
            self.discard(next(iter(keys)))
        if len(self._entries) > self.total:
            self.discard(next(iter(self._entries)))

    def discard(self, digest: str) -> None:
        entry = self._entries.pop(digest, None)
        if entry is None or entry.principal is None:
            return
        tenant = entry.principal.tenant
        keys = self._by_tenant.get(tenant)
        if keys is not None:
            keys.pop(digest, None)
            if not keys:
                del self._by_tenant[tenant]


class Identity:
    """Turns a request's credentials into a Principal.

    API keys are exchanged once at the auth service and the token is cached under the
    key's hash (never the key itself) until `revalidate_seconds` pass or shortly before
    it expires, whichever is sooner. Refused keys are remembered for `refused_seconds`
    in a cache of their own, so that a client retrying a bad key in a loop does not
    turn into load on the auth service, and a flood of junk keys only ever pushes out
    other junk.

    A key with no accepted exchange cached (a new key, or junk) goes through the same
    per-client-IP guard as the token endpoint before it reaches the auth service: a
    valid, cached key costs nothing extra; guessing keys on any route costs the same.

    Whatever the credential, a principal whose key was revoked or whose tenant was
    disabled (`revocations`) is refused, tokens already minted included.
    """

    def __init__(
        self,
        verifier: TokenVerifier,
        auth: ServiceClient,
        *,
        revalidate_seconds: float = 30.0,
        refused_seconds: float = 5.0,
        max_keys: int = 100_000,
        max_keys_per_tenant: int = 1_000,
        max_refused: int = 10_000,
        guard: ClientGuard | None = None,
        revocations: Revocations | None = None,
    ) -> None:
        self.verifier = verifier
        self.auth = auth
        self.revalidate_seconds = revalidate_seconds
        self.refused_seconds = refused_seconds
        self.guard = guard
        self.revocations = revocations
        self._keys = _KeyCache(max_keys, max_keys_per_tenant)
        self._refused: OrderedDict[str, float] = OrderedDict()  # digest -> until (monotonic)
        self.max_refused = max_refused
        self._exchanges: SingleFlight[_Entry] = SingleFlight()
        self.exchanges = 0  # calls made to the auth service, for metrics and tests

    async def authenticate(self, scope: Scope) -> Principal:
        query: bytes = scope["query_string"]
        if query and credentials_in_query(query):
            raise KeyInQuery()
        authorization = api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization" or name == b"x-api-key":
                if authorization is not None or api_key is not None:
                    raise InvalidToken()  # more than one credential: believe none
                text = value.decode("latin-1").strip()
                if name == b"x-api-key":
                    api_key = text
                else:
                    authorization = text
        if authorization is not None:
            scheme, _, credential = authorization.partition(" ")
            if scheme.lower() != "bearer" or not credential.strip():
                raise MissingToken()
            credential = credential.strip()
            if looks_like_api_key(credential):
                return await self._from_api_key(credential, scope)
            principal = await self.verifier.verify(credential)
            if self._revoked(principal):
                raise InvalidToken("revoked")
            return principal
        if api_key is not None:
            return await self._from_api_key(api_key, scope)
        raise MissingToken()

    def _revoked(self, principal: Principal) -> bool:
        revocations = self.revocations
        # Two set lookups, and none while nothing is revoked (the common case).
        return (
            revocations is not None
            and bool(revocations.keys or revocations.tenants)
            and revocations.refuses(principal)
        )

    async def _from_api_key(self, key: str, scope: Scope) -> Principal:
        digest = cache_key(key)
        entry = self._keys.get(digest)
        now = time.monotonic()
        if entry is None or entry.fresh_until <= now:
            guarded = entry is None
            if guarded:
                refused_until = self._refused.get(digest)
                if refused_until is not None and refused_until > now:
                    raise InvalidCredentials()
            # One exchange per key at a time: concurrent requests wait for it (and for
            # its one pass through the guard).
            entry = await self._exchanges.run(
                digest, lambda: self._exchange(key, scope if guarded else None)
            )
            self._remember(digest, entry)
        if entry.principal is None:
            raise InvalidCredentials()
        if self._revoked(entry.principal):
            raise InvalidCredentials()
        return entry.principal

    async def _exchange(self, key: str, guarded: Scope | None) -> _Entry:
        if guarded is not None and self.guard is not None:
            # Never accepted here (new, or junk): it costs what a token exchange costs
            # this client.
            await self.guard.check(guarded, TOKEN_EXCHANGE)
        self.exchanges += 1
        try:
            response = await self.auth.post(
                TOKEN_EXCHANGE, headers={"x-api-key": key}, deadline=5.0
            )
        except UpstreamError as exc:
            # The auth service being away is a 503, never a verdict on the key.
            raise ServiceUnavailable(headers={"Retry-After": "1"}) from exc
        now = time.monotonic()
        if response.status_code in (400, 401, 403):
            return _Entry(None, now + self.refused_seconds)
        if response.status_code != 200:
            raise ServiceUnavailable(headers={"Retry-After": "1"})
        principal = await self.verifier.verify(response.json()["access_token"])
        # Renew a minute before the token expires, and at least every revalidate period.
        lifetime = principal.expires_at - time.time() - 60.0
        return _Entry(principal, now + min(self.revalidate_seconds, max(1.0, lifetime)))

    def _remember(self, digest: str, entry: _Entry) -> None:
        if entry.principal is not None:
            self._refused.pop(digest, None)
            self._keys.put(digest, entry)
            return
        self._keys.discard(digest)  # revoked since it was last accepted
        self._refused[digest] = entry.fresh_until
        self._refused.move_to_end(digest)
        while len(self._refused) > self.max_refused:
            self._refused.popitem(last=False)


def credentials_in_query(query: bytes) -> bool:
    """Whether a raw query string carries something that looks like a credential."""
    decoded = unquote_to_bytes(query.replace(b"+", b" ")).lower()
    return b"nx_" in decoded or any(
        decoded.startswith(p) or b"&" + p in decoded for p in _CREDENTIAL_PARAMS
    )
