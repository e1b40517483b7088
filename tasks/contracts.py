"""What one task hands the next: ids, paths, hashes, counts and settings, never the subject's text.

Each is also written to the ticket's work directory (`as_json`), where the evidence report reads it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from expunge_ml.serving import Adapter


def _without_empty(data: dict[str, Any]) -> dict[str, Any]:
    """Fields that do not apply to this result (None, or an empty tuple) are left out of its JSON file."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items() if v is not None and v != ()}


@dataclass(frozen=True)
class ResolvedRequest:
    """The request resolved to its data: the target's description and the forget / retain manifests (files of
    record ids and keyed hashes), with their counts and fingerprints."""

    target_path: str
    forget_manifest: str
    retain_manifest: str
    forget_count: int
    retain_count: int
    neighbour_count: int
    erased_before_count: int
    forget_fingerprint: str
    retain_fingerprint: str
    matched_by: Mapping[str, int]
    target_uri: str
    corpus_kind: str
    passage_words: int | None = None  # a document corpus: how its documents were cut into records
    prefix_words: int | None = None

    def as_json(self) -> dict[str, Any]:
        return _without_empty({**asdict(self), "matched_by": dict(self.matched_by)})

    def audit_payload(self) -> dict[str, Any]:
        return {"forget_count": self.forget_count, "retain_count": self.retain_count,
                "neighbour_count": self.neighbour_count, "matched_by": dict(self.matched_by),
                "forget_fingerprint": self.forget_fingerprint, "retain_fingerprint": self.retain_fingerprint,
                "target_uri": self.target_uri}


@dataclass(frozen=True)
class TrainedUnlearning:
    """What an unlearning method trained: assistants to subtract from the target (`adapter_dirs`, each served at
    its `weights` entry) or a whole edited model (`model_dir`, `weights_sha256`)."""

    method: str
    trains: str  # expunge_ml.methods.registry.ASSISTANT or FULL_MODEL
    config: Mapping[str, Any]
    report: Mapping[str, Any]
    forget_pairs: int
    retain_pairs: int
    adapter_dirs: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    model_dir: str | None = None
    weights_sha256: str | None = None
    trainable_parameters: int | None = None
    ensemble_reports: tuple[Mapping[str, Any], ...] = ()  # one training report per assistant, when several
    weight_selection: Mapping[str, Any] | None = None  # the served w and what it was chosen from: counts, ratios
    question_wordings: int | None = None  # how many question wordings a paraphraser wrote, and which one
    paraphraser_weights_sha256: str | None = None
    auto_settings: Mapping[str, Any] | None = None  # values an `auto` profile derived from the target, and why
    prompt_template: str | None = None  # the frame the model was trained in (the target's: its chat template or QA)
    # Per assistant, how far training got (`expunge_ml.methods.uld.convergence`): numbers against targets.
    convergence: tuple[Mapping[str, Any], ...] = ()
    inputs_fingerprint: str | None = None  # keyed hash of what it was trained from (`tasks.resume`)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TrainedUnlearning":
        """The inverse of `as_json` (its file in the work directory)."""
        sequences = {"adapter_dirs", "weights", "ensemble_reports", "convergence"}
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if k in sequences else v for k, v in data.items() if k in known})

    @property
    def converged(self) -> bool:
        """False when an assistant learned too little of the forget set for its subtraction to mean anything."""
        return all(c["converged"] for c in self.convergence)

    def convergence_detail(self) -> str:
        """The numbers behind `converged` / `warnings` for a status reason (no data, losses only)."""
        return "; ".join(
            f"assistant {i + 1}: " + ("diverged (a loss is not a number), " if c["diverged"] else "")
            + f"forget NLL {c['forget_nll']} (target {c['target_forget_loss']}, uniform guess "
            f"{c['uniform_nll']}), retain KL {c['retain_kl']} (target {c['stop_max_retain_kl']}) after "
            f"{c['epochs']} of {c['max_epochs']} epochs"
            for i, c in enumerate(self.convergence))

    def warnings(self) -> list[str]:
        """What the run should tell its user although it goes on to evaluation."""
        if self.convergence and not all(c["reached_target"] for c in self.convergence):
            return [f"assistant_above_target: {self.convergence_detail()}; evaluated anyway, the gates decide"]
        return []

    def new_adapters(self, key: bytes) -> list[Adapter]:
        """This erasure's assistants as served: each (sealed) adapter directory with its share of w."""
        return [Adapter(path, weight, key) for path, weight in zip(self.adapter_dirs, self.weights, strict=True)]

    def as_json(self) -> dict[str, Any]:
        return _without_empty(asdict(self))

    def audit_payload(self) -> dict[str, Any]:
        payload = {"method": self.method, "config": dict(self.config), "report": dict(self.report)}
        if self.weight_selection:
            payload["weight_selection"] = dict(self.weight_selection)
        if self.convergence:
            payload["convergence"] = [dict(c) for c in self.convergence]
        return payload


@dataclass(frozen=True)
class Evaluation:
    """The evidence's key numbers and the request type's gates, and where the full evidence was written."""

    request_type: str
    metrics: Mapping[str, Any]
    gates: tuple[Mapping[str, Any], ...]
    passed: bool
    evidence_path: str
    metrics_path: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"request_type": self.request_type, "metrics": self.metrics, "gates": list(self.gates),
                "passed": self.passed, "evidence_path": self.evidence_path}

    def failed_gates(self) -> list[Mapping[str, Any]]:
        return [g for g in self.gates if not g["passed"]]


@dataclass(frozen=True)
class Registration:
    model_uri: str
    name: str
    version: str
    mlflow_run_id: str
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "aliases": list(self.aliases)}
