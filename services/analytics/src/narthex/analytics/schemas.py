"""Query parameters of the analytics API (the reports are documented by service.usage_report)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import Query

From = Annotated[
    datetime | None,
    Query(alias="from", description="start (ISO 8601; UTC if no offset); default: to - 24 h / 7 d"),
]
To = Annotated[datetime | None, Query(description="end (ISO 8601), exclusive; default: now")]
GranularityParam = Annotated[
    Literal["hour", "day"], Query(description="one point per UTC hour or day")
]
TenantParam = Annotated[
    str | None,
    Query(min_length=1, max_length=64, description="a tenant id; omitted: every tenant"),
]
