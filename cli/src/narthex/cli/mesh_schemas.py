"""Offline schema validation: Kubernetes kinds (kubernetes-validate's JSON schemas) and
Istio kinds (the vendored CRDs' openAPIV3Schema, their CEL rules included), with errors
worded as the API server words them."""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError
from referencing import Registry, Resource

__all__ = ["SchemaError", "SchemaSet", "kubernetes_errors"]

# The API server validates metadata itself; a CRD's schema describes spec and status only.
_ROOT_FIELDS = {
    "apiVersion": {"type": "string"},
    "kind": {"type": "string"},
    "metadata": {"type": "object"},
}


@dataclass(frozen=True)
class SchemaError:
    """One validation failure: where in the object, and the API server's wording."""

    path: str
    message: str


def _path(parts: Iterator[str | int] | Any) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "<root>"


def _word(error: jsonschema.ValidationError) -> SchemaError:
    """A jsonschema error as `kubectl apply` would show the API server's refusal."""
    path = _path(error.absolute_path)
    value, validator, expected = error.instance, error.validator, error.validator_value
    if validator == "required":
        missing = re.match(r"'([^']+)' is a required property", error.message)
        field = missing.group(1) if missing else "?"
        return SchemaError(path, f"{_join(path, field)}: Required value")
    if validator == "additionalProperties" and expected is False:
        extra = re.findall(r"'([^']+)'", error.message.split("(")[-1])
        fields = ", ".join(f'"{_join(path, name)}"' for name in extra) or "?"
        return SchemaError(path, f"unknown field {fields}")
    if validator == "enum":
        supported = ", ".join(json.dumps(item) for item in expected)
        return SchemaError(
            path, f"{path}: Unsupported value: {json.dumps(value)}: supported values: {supported}"
        )
    if validator == "type":
        return SchemaError(
            path,
            f"{path}: Invalid value: {_short(value)}: {path} in body must be of type {expected}",
        )
    bounds = {
        "maximum": "should be less than or equal to",
        "minimum": "should be greater than or equal to",
        "exclusiveMaximum": "should be less than",
        "exclusiveMinimum": "should be greater than",
        "maxLength": "should be at most {} chars long",
        "minLength": "should be at least {} chars long",
        "maxItems": "should have at most {} items",
        "minItems": "should have at least {} items",
        "maxProperties": "should have at most {} properties",
        "minProperties": "should have at least {} properties",
        "pattern": "should match '{}'",
    }
    if validator in bounds:
        phrase = bounds[str(validator)]
        phrase = phrase.format(expected) if "{}" in phrase else f"{phrase} {expected}"
        shown = len(value) if validator.endswith("Properties") else value
        return SchemaError(path, f"{path}: Invalid value: {_short(shown)}: {path} in body {phrase}")
    if validator == "x-kubernetes-validations":
        return SchemaError(path, f'{path}: Invalid value: "object": {error.message}')
    return SchemaError(path, f"{path}: Invalid value: {_short(value)}: {error.message}")


def _join(path: str, field: str) -> str:
    return field if path == "<root>" else f"{path}.{field}"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


# -- CEL: the x-kubernetes-validations rules ---------------------------------------------------


def _substring(text: celtypes.StringType, start: Any, end: Any = None) -> celtypes.StringType:
    # Kubernetes' CEL string library; cel-python's standard environment lacks it.
    return celtypes.StringType(str(text)[int(start) : None if end is None else int(end)])


_CEL_FUNCTIONS: dict[str, Any] = {"substring": _substring}
_CEL = celpy.Environment()


@functools.cache
def _program(rule: str) -> celpy.Runner | None:
    try:
        return _CEL.program(_CEL.compile(rule), functions=_CEL_FUNCTIONS)
    except CELParseError:
        return None


def _evaluation_failure(exc: BaseException) -> str | None:
    """Why a rule could not be evaluated, when the cause is the object (as the API server
    reports it), or None when the cause is a function this runtime lacks (such a rule is
    not judged: it is Kubernetes' library, e.g. url(), on fields narthex does not use)."""
    text = repr(exc)
    if "undeclared reference" in text or "no such overload" in text:
        return None
    if "invalid literal for int()" in text:
        return "type conversion error from string to int"
    return "rule evaluation error: " + str(exc.args[0] if exc.args else exc)


def _cel_rules(
    validator: Any, rules: list[Mapping[str, Any]], instance: Any, schema: Mapping[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    for rule in rules:
        expression = str(rule.get("rule", ""))
        if "oldSelf" in expression:  # transition rules need the stored object
            continue
        program = _program(expression)
        if program is None:
            continue
        message = str(rule.get("message") or f"failed rule: {expression}")
        try:
            result = program.evaluate({"self": json_to_cel(instance)})
        except CELEvalError as exc:
            failure = _evaluation_failure(exc)
            if failure is not None:
                yield jsonschema.ValidationError(failure)
            continue
        if isinstance(result, CELEvalError):
            failure = _evaluation_failure(result)
            if failure is not None:
                yield jsonschema.ValidationError(failure)
        elif result != celtypes.BoolType(True):
            yield jsonschema.ValidationError(message)


def _int_or_string(
    validator: Any, enabled: bool, instance: Any, schema: Mapping[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if enabled and not isinstance(instance, int | str):
        yield jsonschema.ValidationError(f"{instance!r} is not an integer or a string")


def _openapi_type(
    validator: Any, types: Any, instance: Any, schema: Mapping[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if instance is None and schema.get("nullable"):
        return
    if schema.get("x-kubernetes-int-or-string"):
        return
    yield from jsonschema.Draft7Validator.VALIDATORS["type"](validator, types, instance, schema)


_OpenApiValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {
        "type": _openapi_type,
        "x-kubernetes-validations": _cel_rules,
        "x-kubernetes-int-or-string": _int_or_string,
    },
)


def _strict(schema: Any) -> Any:
    """Unknown fields refused (kubectl's --validate=strict), except where the schema keeps
    them (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, dict):
        out = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


class SchemaSet:
    """The Istio CRDs' schemas, by (group/version, kind)."""

    def __init__(self, crds_file: Path) -> None:
        self.validators: dict[tuple[str, str], Any] = {}
        for crd in yaml.load_all(crds_file.read_text(), Loader=yaml.CSafeLoader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                root = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                root.setdefault("properties", {}).update(_ROOT_FIELDS)
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                self.validators[key] = _OpenApiValidator(_strict(root))

    def knows(self, api_version: str, kind: str) -> bool:
        return (api_version, kind) in self.validators

    def errors(self, obj: Mapping[str, Any]) -> list[SchemaError]:
        validator = self.validators[(str(obj.get("apiVersion")), str(obj.get("kind")))]
        found = sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))
        return [_word(error) for error in found]


@functools.cache
def _kubernetes_validator(version: str, api_version: str, kind: str) -> Any | None:
    """kubernetes-validate's strict schema for a kind, compiled once (its own `validate`
    reads and parses the definitions file for every object: 20 ms each)."""
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    directory = root / f"v{version}.0-local-strict"
    # rbac.authorization.k8s.io/v1 -> rbac-v1; apps/v1 -> apps-v1; v1 -> v1
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema_file = directory / f"{kind.lower()}-{group}.json"
    if not schema_file.is_file():
        return None
    schema = json.loads(schema_file.read_text())
    definitions = json.loads((directory / "_definitions.json").read_text())
    registry: Registry[Any] = Resource.from_contents(schema) @ Registry()
    registry = Resource.from_contents(definitions) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def kubernetes_errors(obj: Mapping[str, Any], version: str) -> list[SchemaError] | None:
    """A built-in kind against Kubernetes' own schema (strict: unknown fields refused), as
    kubernetes-validate ships it for `version` (major.minor); None when that version has no
    schema for the kind."""
    validator = _kubernetes_validator(version, str(obj.get("apiVersion")), str(obj.get("kind")))
    if validator is None:
        return None
    found = sorted(validator.iter_errors(dict(obj)), key=lambda e: list(map(str, e.path)))
    return [_word(error) for error in found]
