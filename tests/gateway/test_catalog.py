"""A plan's allowed models: the model a request names, the 403, the filtered model list.
(With real auth, inference and gateway processes: tests/e2e/test_allowed_models.py.)"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from narthex.common.errors import BadGateway
from narthex.common.plans import TenantLimits
from narthex.gateway.catalog import check_model, visible_models
from narthex.gateway.errors import ModelNotAllowed
from narthex.gateway.routing import RouteTable

TABLE = RouteTable()


def plan(*allowed: str) -> TenantLimits:
    return TenantLimits(
        tenant="t_a",
        plan="research",
        rate_per_second=10.0,
        burst=10,
        daily_quota=1000,
        max_items_per_request=100,
        allowed_models=allowed,
    )


def check(path: str, document: Any, tenant_plan: TenantLimits) -> None:
    route = TABLE.match(path)
    assert route is not None
    check_model(route, path, document, tenant_plan)


@pytest.mark.parametrize(
    ("path", "document"),
    [
        ("/v1/models/minilm/predict", None),
        ("/v1/models/minilm/versions/1/predict", None),
        ("/v1/models/minilm", None),
        ("/v2/models/minilm", None),
        ("/v2/models/minilm/versions/2/infer", None),
        ("/v2/models/minilm/ready", None),
        ("/v1/embeddings", {"model": "minilm", "input": "x"}),
        ("/v1/embeddings", {"model": "minilm:1", "input": "x"}),
        ("/v1/models/fraudster/predict", None),  # a prefix of no allowed name counts for nothing
    ],
)
def test_a_model_the_plan_does_not_include_is_403_naming_it(path: str, document: Any) -> None:
    with pytest.raises(ModelNotAllowed) as refused:
        check(path, document, plan("fraud"))
    assert refused.value.status == 403
    named = "fraudster" if "fraudster" in path else "minilm"
    assert refused.value.detail == f"the research plan does not include model {named!r}"
    assert refused.value.extra == {"model": named, "allowed_models": ["fraud"]}


@pytest.mark.parametrize(
    ("path", "document"),
    [
        ("/v1/models/fraud/predict", None),
        ("/v2/models/fraud/versions/2/infer", None),
        ("/v1/embeddings", {"model": "fraud:2"}),
        ("/v1/models", None),  # the listing: filtered, not refused
        ("/v2", None),  # server metadata and health name no model
        ("/v2/health/ready", None),
        ("/v1/events/transactions", {"events": []}),
    ],
)
def test_allowed_models_and_requests_that_name_none_pass(path: str, document: Any) -> None:
    check(path, document, plan("fraud"))


@pytest.mark.parametrize("document", [{"input": "x"}, {"model": 5}, ["minilm"], None])
def test_an_embeddings_request_naming_no_model_is_refused_when_the_plan_restricts(
    document: Any,
) -> None:
    with pytest.raises(ModelNotAllowed, match="names no model"):
        check("/v1/embeddings", document, plan("fraud"))
    check("/v1/embeddings", document, plan())  # no restriction: the upstream says what is wrong


def test_an_empty_list_allows_every_model() -> None:
    for path in ("/v1/models/anything/predict", "/v2/models/else/infer"):
        check(path, None, plan())
    check("/v1/embeddings", {"model": "minilm"}, plan())


def test_a_long_name_is_cut_in_the_refusal() -> None:
    with pytest.raises(ModelNotAllowed) as refused:
        check("/v1/models/" + "m" * 500 + "/predict", None, plan("fraud"))
    assert refused.value.extra["model"] == "m" * 64 + "..."


LISTING = {
    "object": "list",
    "data": [{"id": "fraud", "versions": []}, {"id": "minilm", "versions": []}],
}


def test_the_model_list_shows_only_allowed_models() -> None:
    content = orjson.dumps(LISTING)
    shown = orjson.loads(visible_models(content, plan("fraud", "gone")))
    assert shown == {"object": "list", "data": [{"id": "fraud", "versions": []}]}
    assert visible_models(content, plan()) is content  # no restriction: untouched


def test_an_unreadable_model_list_is_a_bad_gateway_not_a_leak() -> None:
    for content in (b"not json", b'{"data": 5}', b'{"data": [{"name": "x"}]}'):
        with pytest.raises(BadGateway):
            visible_models(content, plan("fraud"))
