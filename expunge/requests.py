"""The compliance request a privacy/legal team files, as validated data, and its statutory due date."""
from __future__ import annotations

import calendar
from datetime import datetime, timedelta
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REQUEST_TYPES = ("privacy_erasure", "copyright_takedown")
# Days (or months) a controller has to act. GDPR Art. 12(3): one month from receipt.
DEADLINES: dict[str, tuple[str, int]] = {
    "GDPR": ("months", 1),
    "UK-GDPR": ("months", 1),
    "CCPA": ("days", 45),
    "DMCA": ("days", 14),
}
DEFAULT_DEADLINE = ("days", 30)


class RequestError(ValueError):
    """A user error in a request file: reported in one line, never as a traceback."""

    def __init__(self, reason_code: str, message: str, ticket_id: str | None = None):
        super().__init__(message)
        self.reason_code = reason_code
        self.ticket_id = ticket_id


class Subject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    names: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list)
    identifiers: list[str] = Field(default_factory=list)  # emails, phones, account numbers, …
    document_ids: list[str] = Field(default_factory=list)

    @field_validator("names", "aliases", "identifiers", "document_ids")
    @classmethod
    def _strip(cls, values: list[str]) -> list[str]:
        return [v.strip() for v in values if v and v.strip()]


class CorpusRef(BaseModel):
    """Where the target model's training corpus is, when the registry does not already know."""

    model_config = ConfigDict(extra="forbid")
    source: str
    split: str = "train"
    columns: dict[str, str] = Field(default_factory=dict)
    # records of the same kind the model never trained on: membership-inference (PrivLeak) non-members
    holdout: str = ""
    # questions the model answered before it met this corpus: general ability, gated by min_general_ratio
    general: str = ""
    # qa (question/answer columns) or documents (a text column, cut into passages whose first prefix_words
    # words prompt the rest); auto tells them apart by the columns
    kind: Literal["auto", "qa", "documents"] = "auto"
    passage_words: int = Field(default=64, ge=2, le=4096)
    prefix_words: int = Field(default=16, ge=1, le=4095)


class RequestSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ticket_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    type: Literal["privacy_erasure", "copyright_takedown"]
    regulation: str
    subject: Subject
    target_model: str
    requested_by: str | None = None
    method: str = "uld"
    corpus: CorpusRef | None = None
    # The registry name the unlearned versions go under; default: the target's own registered name, or
    # `<model directory or hub name>-unlearned` for a model outside the registry.
    registered_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    notes: str | None = None

    @model_validator(mode="after")
    def _subject_is_specific(self) -> "RequestSpec":
        s = self.subject
        if self.type == "privacy_erasure" and not (s.names or s.identifiers):
            raise ValueError("a privacy_erasure needs subject.names or subject.identifiers")
        if self.type == "copyright_takedown" and not (s.document_ids or s.names):
            raise ValueError("a copyright_takedown needs subject.document_ids (or work titles in subject.names)")
        return self


def _first_error(exc: ValidationError) -> tuple[str, str]:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "request"
    if err["type"] == "missing":
        return "missing_field", f"missing required field '{where}'"
    if where == "type" and err["type"] == "literal_error":
        return "unknown_request_type", (
            f"unknown request type {err.get('input')!r} (expected one of: {', '.join(REQUEST_TYPES)})"
        )
    if err["type"] == "extra_forbidden":
        return "unknown_field", f"unknown field '{where}'"
    return "invalid_field", f"invalid '{where}': {err['msg']}"


def parse_request(text: str) -> RequestSpec:
    """Parse request YAML; raise RequestError (with the ticket id when readable) on any problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RequestError("malformed_yaml", f"malformed YAML{where}") from None
    if not isinstance(data, dict):
        raise RequestError("malformed_yaml", "request file must be a YAML mapping of fields")
    ticket = data.get("ticket_id")
    ticket = str(ticket) if isinstance(ticket, (str, int)) else None
    try:
        return RequestSpec.model_validate(data)
    except ValidationError as exc:
        code, message = _first_error(exc)
        raise RequestError(code, message, ticket) from None


def add_months(moment: datetime, months: int) -> datetime:
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def due_date(regulation: str, received_at: datetime) -> datetime:
    unit, amount = DEADLINES.get(regulation.upper(), DEFAULT_DEADLINE)
    return add_months(received_at, amount) if unit == "months" else received_at + timedelta(days=amount)
