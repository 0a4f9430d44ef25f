"""The scenario file (YAML): who the users are, how often each acts and thinks, the plans
the run's tenants get, and the noisy neighbour, if any."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from narthex.loadtests.yamlfile import load_model

__all__ = [
    "CLASS_NAMES",
    "USER_CLASSES",
    "Flood",
    "PlanSize",
    "Scenario",
    "ScenarioError",
    "UserConfig",
    "load_scenario",
]

# The user classes a scenario configures, by the name the scenario (and each request's
# Locust name, and the tenant made for it) gives them.
UserName = Literal["embedder", "openai", "fraud", "watcher", "operator"]
USER_CLASSES: tuple[UserName, ...] = ("embedder", "openai", "fraud", "watcher", "operator")
# Their Locust classes (narthex.loadtests.users), named here so that choosing them does not
# import Locust, which patches the importing process for gevent.
CLASS_NAMES: dict[str, str] = {
    "embedder": "EmbedderUser",
    "openai": "OpenAIUser",
    "fraud": "FraudUser",
    "watcher": "WatcherUser",
    "operator": "OperatorUser",
    "flood": "FloodUser",
}


class ScenarioError(Exception):
    """A scenario file that cannot be used: one line saying why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Seconds = Annotated[float, Field(ge=0, le=600)]


Count = Annotated[int, Field(ge=1, le=10_000)]


def _check_ranges(wait: tuple[float, float], items: tuple[int, int]) -> None:
    if wait[1] < wait[0]:
        raise ValueError("wait is [shortest, longest] seconds")
    if items[1] < items[0]:
        raise ValueError("items is [fewest, most] per request")


class UserConfig(_Strict):
    """One kind of user: its share of the run's users and its think time between tasks."""

    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    wait: tuple[Seconds, Seconds] = (1.0, 2.0)
    # Items per request: texts per embedding request, events per posted batch.
    items: tuple[Count, Count] = (1, 1)

    @model_validator(mode="after")
    def _ordered(self) -> UserConfig:
        _check_ranges(self.wait, self.items)
        return self


class PlanSize(_Strict):
    """A plan for the run, sized per simulated user so that the usual mix is not refused."""

    rate_per_user: Annotated[float, Field(gt=0, le=10_000)] = 20.0
    burst_per_user: Annotated[int, Field(ge=1, le=100_000)] = 50
    daily_quota: Annotated[int, Field(ge=1)] = 10_000_000
    max_items_per_request: Annotated[int, Field(ge=1, le=10_000)] = 64

    def numbers(self, users: int) -> tuple[float, int]:
        """(rate per second, burst) for a run of `users` users, within the admin API's bounds."""
        users = max(users, 1)
        return min(self.rate_per_user * users, 100_000.0), min(
            self.burst_per_user * users, 1_000_000
        )


class Flood(_Strict):
    """The noisy neighbour: its own tenant and large plan, embedding back to back."""

    users: Annotated[int, Field(ge=1, le=1000)] = 1
    wait: tuple[Seconds, Seconds] = (0.0, 0.0)
    items: tuple[Count, Count] = (8, 8)
    plan: PlanSize = PlanSize(rate_per_user=5_000.0, burst_per_user=10_000)

    @model_validator(mode="after")
    def _ordered(self) -> Flood:
        _check_ranges(self.wait, self.items)
        return self


class Scenario(_Strict):
    users: dict[UserName, UserConfig] = Field(min_length=1)
    plan: PlanSize = PlanSize()
    flood: Flood | None = None
    embedding_model: str = "minilm"
    fraud_model: str = "fraud"
    # A 429's Retry-After is honoured up to this long (a plan misconfigured for the load
    # would otherwise park users for the rest of the run).
    max_retry_after_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # Accounts each fraud user keeps posting to and scoring.
    accounts_per_fraud_user: Annotated[int, Field(ge=1, le=1000)] = 5


def load_scenario(path: Path) -> Scenario:
    return load_model(path, Scenario, "scenario", ScenarioError)
