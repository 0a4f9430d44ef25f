"""Reading a YAML file (scenario, SLA) into its pydantic model, each failure one line."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["load_model"]

M = TypeVar("M", bound=BaseModel)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        return f"{exc.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(exc).splitlines()[0]


def load_model(path: Path, model: type[M], what: str, error: type[Exception]) -> M:
    """`model` from the YAML file at `path`; `error` with one line naming `what` otherwise."""
    try:
        return model.model_validate(yaml.safe_load(path.read_text()))
    except OSError as exc:
        raise error(f"cannot read the {what} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise error(f"the {what} {path} is not YAML: {_yaml_problem(exc)}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top)"
        raise error(f"the {what} {path}: {where}: {first['msg']}") from None
