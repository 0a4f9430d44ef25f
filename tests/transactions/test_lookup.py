"""The batchGet contract: what each side writes is what the shared models accept."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from narthex.transactions import DEFAULTS, FEATURES
from narthex.transactions.lookup import (
    Answer,
    BatchGetRequest,
    BatchGetResponse,
    decode_answer,
    encode_answer,
    encode_request,
)

ENTITIES = [("t_a", "acct:1"), ("t_b", "acct:1"), ("t_a", "{x}")]


def test_a_request_as_inference_writes_it_is_a_valid_batch_get_request() -> None:
    request = BatchGetRequest.model_validate_json(encode_request(ENTITIES, 12.5))
    assert request.entity_ids() == ENTITIES
    assert request.at == 12.5
    assert BatchGetRequest.model_validate_json(encode_request([], None)).at is None


def test_an_entity_names_its_tenant() -> None:
    with pytest.raises(ValidationError, match="tenant"):
        BatchGetRequest.model_validate({"entities": [{"account": "acct1"}]})
    with pytest.raises(ValidationError):
        BatchGetRequest.model_validate({"entities": ["acct1"]})


def test_an_answer_as_features_writes_it_is_a_valid_response_and_reads_back() -> None:
    known = {name: DEFAULTS[name] + 1.0 for name in FEATURES}
    answers = [
        Answer("t_a", "acct:1", True, known, 3.0),
        Answer("t_b", "acct:1", False, dict(DEFAULTS), None),
    ]
    content = encode_answer(99.0, answers)
    response = BatchGetResponse.model_validate_json(content)
    assert response.feature_names == list(FEATURES)
    assert response.as_of == 99.0
    assert [(f.tenant, f.account, f.known, f.age_seconds) for f in response.features] == [
        ("t_a", "acct:1", True, 3.0),
        ("t_b", "acct:1", False, None),
    ]
    assert decode_answer(content) == {("t_a", "acct:1"): known, ("t_b", "acct:1"): DEFAULTS}


def test_an_answer_missing_a_feature_does_not_read_back() -> None:
    body = orjson.loads(encode_answer(1.0, [Answer("t", "a", True, dict(DEFAULTS), 1.0)]))
    del body["features"][0]["values"][FEATURES[0]]
    with pytest.raises(KeyError):
        decode_answer(orjson.dumps(body))
