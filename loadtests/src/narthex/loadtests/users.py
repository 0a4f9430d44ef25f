"""Locust user classes, one per kind of real user, each acting as its run tenant's client.

Every request is named `<user class> <METHOD> <route>` (the user class is also its tenant's
class), so that the SLA file can name what it judges and leave a noisy neighbour out. A 429
is reported under that name plus ` [limited]`, as a success: the caller then waits the
`Retry-After` it was given, as a well-behaved client does.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import openai
from locust import HttpUser, User, between, task
from locust.exception import StopUser

from narthex.loadtests.answers import (
    BadAnswer,
    Check,
    counted,
    has,
    listing,
    refusal,
    retry_after,
)
from narthex.loadtests.provision import TenantCredentials
from narthex.loadtests.scenario import Scenario, UserConfig
from narthex.loadtests.sla import LIMITED_SUFFIX
from narthex.testing.texts import WORDS
from narthex.transactions import Transaction, simulate

__all__ = [
    "CLASSES",
    "TENANTS",
    "EmbedderUser",
    "FloodUser",
    "FraudUser",
    "OpenAIUser",
    "OperatorUser",
    "Tenants",
    "WatcherUser",
    "configure",
]

PROVISION_WAIT_S = 60.0
REQUEST_TIMEOUT_S = 30.0


class Tenants:
    """The run's tenants, once provisioned (here, or by the master for a worker)."""

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._by_class: dict[str, TenantCredentials] = {}
        self.error: str | None = None
        self.run_id = "run"
        self.scenario = Scenario(users={"embedder": UserConfig()})  # see `configure`

    def publish(self, run_id: str, tenants: list[TenantCredentials]) -> None:
        self.run_id = run_id
        self._by_class = {t.user_class: t for t in tenants}
        self._ready.set()

    def fail(self, error: str) -> None:
        self.error = error
        self._ready.set()

    def of(self, user_class: str) -> TenantCredentials:
        """The tenant of `user_class`, waiting for provisioning; StopUser if it failed."""
        if not self._ready.wait(PROVISION_WAIT_S) or self.error is not None:
            raise StopUser()
        credentials = self._by_class.get(user_class)
        if credentials is None:
            raise StopUser()
        return credentials


TENANTS = Tenants()


def texts(count: int) -> list[str]:
    # Different every time, so that no cache along the way answers for the model.
    return [" ".join(random.choices(WORDS, k=random.randint(6, 16))) for _ in range(count)]


class TenantUser(HttpUser):
    abstract = True
    # The scenario's name for this kind of user: its tenant, and its requests' prefix.
    user_class: ClassVar[str]

    def on_start(self) -> None:
        self.tenant = TENANTS.of(self.user_class)
        self.client.headers["Authorization"] = f"Bearer {self.tenant.key}"

    def call(
        self,
        method: str,
        path: str,
        route: str,
        check: Check | None = None,
        **kwargs: Any,
    ) -> Any | None:
        """One request named `<user class> <METHOD> <route>`: its JSON body when it got a
        200 whose body passes `check`, None when refused or failed (reported as failed)."""
        name = f"{self.user_class} {method} {route}"
        wait = 0.0
        body: Any | None = None
        with self.client.request(
            method, path, name=name, catch_response=True, timeout=REQUEST_TIMEOUT_S, **kwargs
        ) as response:
            if response.status_code == 429:
                response.request_meta["name"] = name + LIMITED_SUFFIX
                response.success()
                wait = retry_after(response.headers, TENANTS.scenario.max_retry_after_s)
            elif response.status_code != 200:
                response.failure(refusal(response.status_code, response.text))
            else:
                try:
                    answer = response.json()
                except ValueError:
                    response.failure("200 with a body that is not JSON")
                else:
                    wrong = check(answer) if check is not None else None
                    if wrong is not None:
                        response.failure(f"200 but {wrong}")
                    else:
                        body = answer
                        response.success()
        if wait:
            time.sleep(wait)  # gevent's, under Locust
        return body


def _items(bounds: tuple[int, int]) -> int:
    return random.randint(bounds[0], bounds[1])


class EmbedderUser(TenantUser):
    """An API client embedding texts over plain HTTP."""

    user_class = "embedder"

    def items(self) -> tuple[int, int]:
        return TENANTS.scenario.users["embedder"].items

    @task
    def embed(self) -> None:
        batch = texts(_items(self.items()))
        self.call(
            "POST",
            "/v1/embeddings",
            "/v1/embeddings",
            listing("data", len(batch)),
            json={"model": TENANTS.scenario.embedding_model, "input": batch},
        )


class FloodUser(EmbedderUser):
    """The noisy neighbour: embeds back to back within its large plan."""

    user_class = "flood"

    def items(self) -> tuple[int, int]:
        flood = TENANTS.scenario.flood
        return flood.items if flood is not None else (8, 8)


class OpenAIUser(User):
    """An API client as most write one: the official `openai` SDK, its base URL the
    gateway's `/v1` and its API key the tenant's."""

    user_class: ClassVar[str] = "openai"
    sdk: openai.OpenAI | None = None

    def on_start(self) -> None:
        tenant = TENANTS.of(self.user_class)
        # No retries of its own: a 429 is reported as limited and honoured here.
        self.sdk = openai.OpenAI(
            base_url=f"{self.host}/v1",
            api_key=tenant.key,
            max_retries=0,
            timeout=REQUEST_TIMEOUT_S,
        )

    def on_stop(self) -> None:
        if self.sdk is not None:  # None: it never started (no tenant)
            self.sdk.close()

    @task
    def embed(self) -> None:
        config = TENANTS.scenario.users["openai"]
        batch = texts(_items(config.items))
        name = f"{self.user_class} POST /v1/embeddings"
        started = time.perf_counter()
        length, wait = 0, 0.0
        error: Exception | None = None
        assert self.sdk is not None  # on_start made it
        try:
            raw = self.sdk.embeddings.with_raw_response.create(
                model=TENANTS.scenario.embedding_model, input=batch
            )
            length = len(raw.http_response.content)
            vectors = raw.parse().data
            if len(vectors) != len(batch):
                error = BadAnswer(f"200 but {len(vectors)} data for {len(batch)} items")
        except openai.RateLimitError as exc:
            name += LIMITED_SUFFIX
            wait = retry_after(exc.response.headers, TENANTS.scenario.max_retry_after_s)
        except openai.APIStatusError as exc:
            error = BadAnswer(refusal(exc.status_code, exc.response.text))
        except openai.APIError as exc:  # no answer: connection refused, timed out
            error = exc
        self.environment.events.request.fire(
            request_type="POST",
            name=name,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=error,
            context={},
        )
        if wait:
            time.sleep(wait)


class FraudUser(TenantUser):
    """A fraud client: posts its accounts' card transactions, then scores them."""

    user_class = "fraud"

    def on_start(self) -> None:
        super().on_start()
        self.serial = itertools.count()
        self.stream = self._transactions()

    def _transactions(self) -> Iterator[Transaction]:
        """Simulated accounts' transactions (their habits: amounts, merchants, currencies,
        channels), re-timed to now, with ids unique to this user and run."""
        prefix = f"lt{TENANTS.run_id}-{id(self) % 100_000}"
        for seed in itertools.count(random.randrange(1 << 30)):
            accounts = TENANTS.scenario.accounts_per_fraud_user
            for labeled in simulate(seed=seed, accounts=accounts, days=1):
                tx = labeled.transaction
                yield Transaction(
                    event_id=f"{prefix}-{next(self.serial)}",
                    account_id=f"{prefix}-{tx.account_id}",
                    merchant_id=tx.merchant_id,
                    amount=tx.amount,
                    currency=tx.currency,
                    timestamp=time.time(),
                    channel=tx.channel,
                )

    @task
    def post_then_score(self) -> None:
        count = _items(TENANTS.scenario.users["fraud"].items)
        batch = list(itertools.islice(self.stream, count))
        posted = self.call(
            "POST",
            "/v1/events/transactions",
            "/v1/events/transactions",
            counted(len(batch)),
            json={"events": [tx.to_dict() for tx in batch]},
        )
        if posted is None:
            return
        model = TENANTS.scenario.fraud_model
        instances = [
            {key: value for key, value in tx.to_dict().items() if key != "event_id"} for tx in batch
        ]
        self.call(
            "POST",
            f"/v1/models/{model}/predict",
            f"/v1/models/{model}/predict",
            listing("predictions", len(instances)),
            json={"instances": instances},
        )


class WatcherUser(TenantUser):
    """A tenant keeping an eye on its quota and its usage."""

    user_class = "watcher"

    @task(3)
    def quota(self) -> None:
        self.call("GET", "/v1/quota", "/v1/quota", has("daily"))

    @task(1)
    def usage(self) -> None:
        self.call("GET", "/v1/usage", "/v1/usage")


class OperatorUser(TenantUser):
    """An operator (an admin tenant) listing the models served, and looking at one."""

    user_class = "operator"

    @task(3)
    def models(self) -> None:
        self.call("GET", "/v1/models", "/v1/models", listing("data"))

    @task(1)
    def model(self) -> None:
        model = TENANTS.scenario.fraud_model
        self.call("GET", f"/v1/models/{model}", f"/v1/models/{model}", has("versions"))


# The scenario's names for the user classes.
CLASSES: dict[str, type[User]] = {
    "embedder": EmbedderUser,
    "openai": OpenAIUser,
    "fraud": FraudUser,
    "watcher": WatcherUser,
    "operator": OperatorUser,
    "flood": FloodUser,
}


def configure(scenario: Scenario) -> None:
    """Weights and think times from the scenario; the flood's users are a fixed count."""
    TENANTS.scenario = scenario
    # Locust's way to configure a class: its class attributes, before any user is made.
    for name, config in scenario.users.items():
        user = CLASSES[name]
        user.weight = config.weight
        user.wait_time = between(*config.wait)
    if scenario.flood is not None:
        FloodUser.fixed_count = scenario.flood.users
        FloodUser.wait_time = between(*scenario.flood.wait)
