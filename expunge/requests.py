"""The compliance request a privacy/legal team files, as validated data, and its statutory due date."""
from __future__ import annotations

import calendar
import re
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
# How much longer a regulation lets a controller take, with a reason given to the requester: GDPR Art. 12(3) two
# further months where requests are complex or numerous; CCPA § 1798.130(a)(2) 45 more days.
EXTENSIONS: dict[str, tuple[str, int]] = {
    "GDPR": ("months", 2),
    "UK-GDPR": ("months", 2),
    "CCPA": ("days", 45),
}


# Limits on what a request may hold, the same on every database: a ticket id of a documented safe alphabet, and
# sizes far above any real request but small enough that nothing unbounded is written for good.
TICKET_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_REQUEST_BYTES = 64 * 1024
MAX_TERMS = 200  # names, aliases, identifiers or document ids in one subject
MAX_TERM_CHARS = 256
MAX_TEXT_CHARS = 4096  # free text: notes, a target or corpus location
MAX_YAML_DEPTH = 20


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
        if len(values) > MAX_TERMS:
            raise ValueError(f"at most {MAX_TERMS} entries")
        if any(len(v) > MAX_TERM_CHARS for v in values):
            raise ValueError(f"an entry is longer than {MAX_TERM_CHARS} characters")
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
    ticket_id: str = Field(pattern=TICKET_ID_PATTERN)
    type: Literal["privacy_erasure", "copyright_takedown"]
    regulation: str = Field(max_length=64)
    subject: Subject
    target_model: str = Field(max_length=MAX_TEXT_CHARS)
    requested_by: str | None = Field(default=None, max_length=MAX_TERM_CHARS)
    method: str = Field(default="uld", max_length=64)
    corpus: CorpusRef | None = None
    # The registry name the unlearned versions go under; default: the target's own registered name, or
    # `<model directory or hub name>-unlearned` for a model outside the registry.
    registered_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    notes: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    # Receives a signed POST (the intake's shared secret) on every status change of the ticket
    callback_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://[^\s]+$")

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


def _depth(node: yaml.Node) -> int:
    """Nesting depth of a composed YAML node, without recursion (a hostile file may nest thousands deep)."""
    deepest, stack = 0, [(node, 1)]
    while stack:
        current, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_YAML_DEPTH:
            break
        if isinstance(current, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in current.value)
        elif isinstance(current, yaml.MappingNode):
            stack.extend((value, depth + 1) for _, value in current.value)
    return deepest


def decode_request(raw: bytes) -> str:
    """The request file's text, or RequestError for a file too large or not text."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise RequestError("request_too_large", f"request file is {len(raw)} bytes; at most {MAX_REQUEST_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("not_text", "request file is not UTF-8 text") from None
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        raise RequestError("not_text", "request file holds control characters") from None
    return text


def parse_request(text: str) -> RequestSpec:
    """Parse request YAML; raise RequestError (with the ticket id when readable and valid) on any problem."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _depth(node) > MAX_YAML_DEPTH:
            raise RequestError("malformed_yaml", f"request nests deeper than {MAX_YAML_DEPTH} levels")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RequestError("malformed_yaml", f"malformed YAML{where}") from None
    except RecursionError:
        raise RequestError("malformed_yaml", f"request nests deeper than {MAX_YAML_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise RequestError("malformed_yaml", "request file must be a YAML mapping of fields")
    ticket = data.get("ticket_id")
    # Only a valid id is kept with a rejection: anything else would be written for good as given.
    ticket = str(ticket) if isinstance(ticket, (str, int)) and re.fullmatch(TICKET_ID_PATTERN, str(ticket)) else None
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


def due_date(regulation: str, received_at: datetime, extension: int = 0) -> datetime:
    """The statutory due date, pushed back by `extension` units of the regulation's extension (`EXTENSIONS`)."""
    unit, amount = DEADLINES.get(regulation.upper(), DEFAULT_DEADLINE)
    amount += extension
    return add_months(received_at, amount) if unit == "months" else received_at + timedelta(days=amount)
