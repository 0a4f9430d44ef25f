"""Which models a caller may reach: its plan's `allowed_models`, enforced at the edge.

A request names its model in its path (`/v1/models/{m}/...`, `/v2/models/{m}/...`) or in its
JSON body (`model` of `/v1/embeddings`, `name` or `name:version`); one its plan does not
allow is refused with 403 naming the model, before it is charged. `GET /v1/models` lists
only the allowed ones. An empty list allows every model (auth's definition).
"""

from __future__ import annotations

from typing import Any

import orjson

from narthex.common.errors import BadGateway
from narthex.common.plans import TenantLimits
from narthex.gateway.errors import ModelNotAllowed
from narthex.gateway.routing import Route

__all__ = ["MODEL_LIST", "check_model", "visible_models"]

MODEL_LIST = "/v1/models"
_SHOWN = 64  # characters of a client's model name repeated in a refusal


def check_model(route: Route, path: str, document: Any, plan: TenantLimits) -> None:
    """403 unless the plan allows the model the request names (`document`: its JSON body)."""
    if not plan.allowed_models:
        return
    if route.model_path is not None and path.startswith(route.model_path):
        name = path[len(route.model_path) :].partition("/")[0]
        if not name:  # a listing, not a model
            return
    elif route.model_field is not None:
        value = document.get(route.model_field) if type(document) is dict else None
        if not isinstance(value, str):
            raise ModelNotAllowed(
                f"the request names no model, and the {plan.plan} plan allows only some",
                extra={"allowed_models": list(plan.allowed_models)},
            )
        name = value.partition(":")[0]
    else:
        return
    if plan.allows_model(name):
        return
    shown = name[:_SHOWN] + ("..." if len(name) > _SHOWN else "")
    raise ModelNotAllowed(
        f"the {plan.plan} plan does not include model {shown!r}",
        extra={"model": shown, "allowed_models": list(plan.allowed_models)},
    )


def visible_models(content: bytes, plan: TenantLimits) -> bytes:
    """The upstream's `GET /v1/models` list with only the models the plan allows."""
    if not plan.allowed_models:
        return content
    try:
        listing = orjson.loads(content)
        listing["data"] = [m for m in listing["data"] if plan.allows_model(m["id"])]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        raise BadGateway("the model list could not be read") from None
    return orjson.dumps(listing)
