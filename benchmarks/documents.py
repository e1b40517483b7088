"""`expunge benchmark documents`: a copyright takedown ("forget this book") measured MUSE-style, under
the settings of a profile.

It answers what a user with a document corpus gets from a profile: the benchmark builds what a takedown
request builds, from the ML core alone (no Prefect, MLflow or database), with the profile's ULD and
baseline settings, its evaluation settings and its `copyright_takedown` gates.

1. Documents: each TOFU author's 20 answers, in TOFU's order, joined into one profile text per author.
   They are read at run time from ../shared and written only to the cache, never to the repository. The
   pipeline's own loader (`open_corpus`, kind `documents`) cuts them into passages whose opening words
   prompt the rest.
2. A small Llama is trained from scratch on the passages of the largest split's forget authors plus
   `n_retain_authors` others, until it continues them verbatim. `holdout_authors` more authors are never
   trained on: they are the membership-inference non-members. The BPE tokenizer is fitted on trained and
   held-out text alike, so both split into tokens the same way (PrivLeak needs that; see expunge_ml/muse.py).
3. Per split, a retain-only oracle is trained the same way without the taken-down documents. It shows what
   a model that never saw them writes after their openings, and its membership AUC is MUSE's PrivLeak
   reference.
4. Per split and method:
   - the forget set is the taken-down documents' passages;
   - the retain set is chosen as the pipeline chooses it (`select_retain`: neighbours first, `retain_max`);
   - the method runs with the profile's settings (ULD: the pipeline's recipe, `expunge_ml.uld_data`, with
     the options' partial `uld` merged over the profile's ULD settings);
   - `collect_evidence` compares the served model with the base as a request's evaluation does, on the
     forget passages and on retained passages the method did not train on;
   - `check_gates` applies the profile's takedown gates.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from expunge_ml.corpus import QARecord
from expunge_ml.modeling import shared_copy
from expunge_ml.tofu import FORGET_SPLITS, TofuData, forget_authors, load_tofu

from .model_cache import load_or_train_model, load_or_train_tokenizer, peak_memory, sha_key
from .run_config import merge
from .tofu import DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR, DEFAULT_OUT_DIR

REQUEST_TYPE = "copyright_takedown"
METHODS = ("uld", "ga", "graddiff", "kl", "npo", "simnpo", "idkdpo", "rmu")  # WHP needs anchor terms: not here
REPORT_STEM = "documents"


class BaseNotMemorised(ValueError):
    """The base does not continue the documents to be taken down: erasing them would prove nothing."""


@dataclass(frozen=True)
class DocumentBenchOptions:
    data_dir: str = str(DEFAULT_DATA_DIR)
    cache_dir: str = str(DEFAULT_CACHE_DIR)
    out_dir: str = str(DEFAULT_OUT_DIR)
    # ULD / baseline settings, evaluation settings and the takedown gates come from this profile
    # (a name under expunge/profiles/ or a YAML path).
    profile: str = "demo"
    splits: tuple[str, ...] = ("forget01", "forget05")
    methods: tuple[str, ...] = ("uld", "ga", "npo")
    # > 0: take down the first N trained retain authors instead of the TOFU splits, so that settings can be
    # chosen without looking at the reported takedowns (the "dev" split).
    dev_authors: int = 0
    dev_offset: int = 0  # the development takedown starts at this trained retain author (another draw of N)
    # With the largest split's 10 authors (84 passages) and three retain passages trained per forget passage,
    # 40 retain authors still leave retained passages no method trained on, to measure what it keeps.
    n_retain_authors: int = 40
    holdout_authors: int = 5
    # How the corpus is cut, as a request's `corpus:` block says it (CorpusSpec's defaults).
    passage_words: int = 64
    prefix_words: int = 16
    # The base (and oracles): a small Llama from scratch; the field names are TofuBenchOptions' so the model
    # cache (`benchmarks.model_cache`) is shared code.
    pretrained: str | None = None
    vocab_size: int = 2048
    hidden_size: int = 160
    intermediate_size: int = 432
    num_layers: int = 4
    num_heads: int = 4
    max_length: int = 160
    base_epochs: int = 200
    base_lr: float = 3e-3
    base_batch_size: int = 16
    # Low enough that a base trained on another CPU (another float summation order) still continues the
    # documents past min_base_rougeL.
    base_target_loss: float = 0.03
    # Below this forget continuation ROUGE-L the base has not memorised the documents and a takedown
    # proves nothing: the run stops.
    min_base_rougeL: float = 0.9
    # ULD settings merged over the profile's (e.g. {"weight": -1.0, "epochs": 30}); for choosing settings on
    # the dev split.
    uld: Mapping[str, Any] = field(default_factory=dict)
    # Override of the profile's `unlearning.retain_per_forget` (None: the profile's; 0: retain_max only).
    retain_per_forget: float | None = None
    max_new_tokens: int | None = None  # override of the profile's evaluation max_new_tokens
    seed: int = 0
    threads: int | None = None
    device: str = "auto"
    write: bool = True
    quiet: bool = False

    def validate(self) -> None:
        unknown = [s for s in self.splits if s not in FORGET_SPLITS]
        if not self.dev_authors and (unknown or not self.splits):
            raise ValueError(f"unknown or no splits {unknown}; known: {', '.join(FORGET_SPLITS)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown or no methods {bad}; known: {', '.join(METHODS)}")
        if self.dev_authors < 0 or self.dev_authors >= self.n_retain_authors:
            raise ValueError(f"dev_authors must be in [0, n_retain_authors = {self.n_retain_authors}), "
                             f"got {self.dev_authors}")
        if self.dev_offset < 0 or self.dev_offset + self.dev_authors > self.n_retain_authors:
            raise ValueError(f"dev_offset + dev_authors must be within the {self.n_retain_authors} trained retain "
                             f"authors, got {self.dev_offset} + {self.dev_authors}")
        if self.holdout_authors < 1:
            raise ValueError("holdout_authors must be >= 1: the membership evidence needs non-members")


# ------------------------------------------------------------------------------------------ data


@dataclass
class DocumentPlan:
    """Which authors' documents play which part (pure: derived from the options and the TOFU layout)."""

    trained_authors: list[int]
    retain_authors: list[int]
    holdout_authors: list[int]
    takedowns: dict[str, list[int]]  # split → the authors whose documents it takes down


def make_plan(opts: DocumentBenchOptions) -> DocumentPlan:
    reported = forget_authors(max(opts.splits, key=lambda s: FORGET_SPLITS[s]))
    others = [a for a in range(200) if a not in forget_authors("forget10")]
    retain = others[: opts.n_retain_authors]
    holdout = others[opts.n_retain_authors: opts.n_retain_authors + opts.holdout_authors]
    if opts.dev_authors:
        takedowns = {"dev": retain[opts.dev_offset: opts.dev_offset + opts.dev_authors]}
    else:
        takedowns = {split: forget_authors(split) for split in opts.splits}
    return DocumentPlan(sorted(reported + retain), retain, holdout, takedowns)


def author_document(data: TofuData, author: int) -> dict[str, str]:
    """One author's answers, in TOFU's order, as one text; the document id names the author by index only."""
    answers = [r.answer.strip() for r in data.author_records([author])]
    return {"document_id": f"author-{author:03d}", "text": " ".join(answers)}


def write_documents(data: TofuData, authors: Sequence[int], path: Path) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(author_document(data, a)) + "\n" for a in authors))
    return path


def load_passages(opts: DocumentBenchOptions, data: TofuData, plan: DocumentPlan, cache: Path):
    """(trained passages, held-out passages, corpus spec) through the pipeline's own document loader."""
    from expunge_ml.corpus import CorpusSpec, load_holdout, open_corpus

    key = sha_key({"trained": plan.trained_authors, "holdout": plan.holdout_authors, "data": opts.data_dir})[:12]
    trained = write_documents(data, plan.trained_authors, cache / f"documents-{key}" / "trained.jsonl")
    held = write_documents(data, plan.holdout_authors, cache / f"documents-{key}" / "holdout.jsonl")
    records, spec = open_corpus(CorpusSpec(str(trained), kind="documents", holdout=str(held),
                                           passage_words=opts.passage_words, prefix_words=opts.prefix_words))
    return records, load_holdout(spec), spec


def documents_of(records: Sequence[QARecord], authors: Sequence[int]) -> list[QARecord]:
    wanted = {f"author-{a:03d}" for a in authors}
    return [r for r in records if r.document_id in wanted]


# ------------------------------------------------------------------------------------------ rows


def summarise(evidence: dict[str, Any], gates: list[dict], oracle_auc: float | None) -> dict[str, Any]:
    """The numbers a table row shows, read from one evidence dict (the unlearned side)."""
    from expunge_ml.gates import GATES
    from expunge_ml.mia import priv_leak

    def gate_value(name: str):  # what that gate reads, whether or not the profile gates it
        return GATES[name][0](evidence)

    auc = (evidence["muse"]["unlearned"].get("mia") or {}).get("auc_min_k_pp")
    return {
        "forget_rougeL": gate_value("max_forget_rougeL"),
        "forget_fact_recall": gate_value("max_forget_fact_recall"),
        "verbmem_forget": gate_value("max_verbmem_forget"),
        "retain_rougeL": evidence["metrics"]["unlearned"]["retain"]["rougeL_recall"],
        "retain_rougeL_ratio": gate_value("min_retain_rougeL_ratio"),
        "mia_auc": auc,
        # MUSE's PrivLeak against the retrained oracle's AUC; ≈ 0 is the retrain gold standard
        "privleak_vs_oracle": priv_leak(auc, oracle_auc) if auc is not None and oracle_auc else None,
        "quantized": {name: {"forget_rougeL": q["forget"]["rougeL_recall"], "recovery": q["recovery"]}
                      for name, q in (evidence.get("quantization") or {}).items()},
        "worst_quant_recovery": gate_value("max_quant_recovery"),
        "fluency_ratio": gate_value("min_fluency_ratio"),
        "gates": gates,
        "gates_passed": all(g["passed"] for g in gates),
        "failed_gates": [g["gate"] for g in gates if not g["passed"]],
    }


# ---------------------------------------------------------------------------------------- runner


def run_documents_benchmark(opts: DocumentBenchOptions, command: str = "", log: Callable[[str], None] | None = None) -> dict:
    import torch

    opts.validate()
    started = time.perf_counter()
    if log is None:
        log = (lambda _m: None) if opts.quiet else (lambda m: print(f"[{time.perf_counter() - started:7.1f}s] {m}", flush=True))
    previous_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        run = DocumentsRun(opts, command, log, started)
        for split, authors in run.plan.takedowns.items():
            run.takedown(split, authors)
        final = run.report(final=True)
        if opts.write:
            paths = write_outputs(final, Path(opts.out_dir))
            log(f"wrote {', '.join(str(p) for p in paths.values())}")
        return final
    finally:
        torch.set_num_threads(previous_threads)


def _profile_settings(opts: DocumentBenchOptions) -> dict[str, Any]:
    """The profile's ULD / baseline configs, evidence options and takedown gates, with the options' overrides."""
    from expunge.settings import load_profile
    from expunge_ml.evidence import EvidenceOptions
    from expunge_ml.gates import gates_for
    from expunge_ml.methods.registry import baseline_config_for, uld_config_for
    from expunge_ml.weight_selection import selection_settings

    profile = load_profile(opts.profile)
    unlearning = profile["unlearning"]
    uld = merge(uld_config_for(unlearning, REQUEST_TYPE), opts.uld, "uld")
    if selection_settings(unlearning, REQUEST_TYPE, uld.weight):
        raise ValueError(f"profile {opts.profile}: weight_selection scores identifiers, which a document takedown "
                         f"has none of: leave {REQUEST_TYPE} out of its request_types")
    evaluation = dict(profile["evaluation"])
    if opts.max_new_tokens is not None:
        evaluation["max_new_tokens"] = opts.max_new_tokens
    return {
        "uld": uld,
        "baselines": {m: baseline_config_for(unlearning, m) for m in opts.methods if m != "uld"},
        "retain_max": int(unlearning["retain_max"]),
        "retain_per_forget": float(opts.retain_per_forget if opts.retain_per_forget is not None
                                   else unlearning.get("retain_per_forget", 0.0)),
        "evaluation": evaluation,
        "evidence": EvidenceOptions.from_profile(evaluation),
        "holdout_max": int(evaluation.get("holdout_max", 64)),
        "gates": gates_for(REQUEST_TYPE, profile["gates"]),
    }


@dataclass
class Takedown:
    """One takedown's passages: taken down, trained on as retain, evaluated as retained."""

    split: str
    forget: list[QARecord]
    kept: list[QARecord]  # every trained passage not taken down (the oracle's training set)
    train_retain: list[QARecord]
    eval_retain: list[QARecord]


class DocumentsRun:
    """One run's shared state: the profile's settings, the passages, the tokenizer and base, the rows so far."""

    def __init__(self, opts: DocumentBenchOptions, command: str, log: Callable[[str], None], started: float) -> None:
        import datasets

        from expunge_ml.corpus import DOCUMENT_PROMPT_TEMPLATE
        from expunge_ml.devices import resolve_device
        from expunge_ml.prompting import PromptFormat

        datasets.disable_progress_bars()  # the loader reads two small JSONL files; a bar per read is noise
        self.opts, self.command, self.log, self.started = opts, command, log, started
        self.started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.device = resolve_device(opts.device)
        self.settings = _profile_settings(opts)
        self.data = load_tofu(opts.data_dir)
        self.plan = make_plan(opts)
        self.cache = Path(opts.cache_dir).expanduser() / "documents"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.records, holdout, self.spec = load_passages(opts, self.data, self.plan, self.cache)
        self.holdout = holdout[: self.settings["holdout_max"]]
        self.fmt = PromptFormat(template=DOCUMENT_PROMPT_TEMPLATE)
        log(f"documents: {len(self.plan.trained_authors)} trained ({len(self.records)} passages of "
            f"{opts.passage_words} words), {len(self.plan.holdout_authors)} held out ({len(self.holdout)} passages); "
            f"takedowns {self.plan.takedowns}")
        # fitted on held-out text too: a tokenizer that splits never-seen text into more pieces makes it look
        # unfamiliar to Min-K%, whatever the model knows (expunge_ml/muse.py, TOKENISATION_TOLERANCE)
        self.tokenizer, self.tokenizer_key = load_or_train_tokenizer(
            opts, [r.pair for r in [*self.records, *self.holdout]], self.cache, log)
        self.base, self.base_meta = self.trained_model("base", self.records)
        self.rows: list[dict] = []

    def trained_model(self, role: str, records: Sequence[QARecord]):
        from expunge_ml.corpus import DOCUMENT_PROMPT_TEMPLATE

        model, meta = load_or_train_model(role, [r.pair for r in records], self.tokenizer, self.tokenizer_key,
                                          self.opts, self.cache, self.log, self.device,
                                          prompt_template=DOCUMENT_PROMPT_TEMPLATE)
        return model.requires_grad_(False), meta

    def report(self, final: bool) -> dict:
        import torch

        settings, plan, opts = self.settings, self.plan, self.opts
        return {
            "command": self.command, "config": asdict(opts), "started_at": self.started_at, "complete": final,
            "wall_seconds": time.perf_counter() - self.started,
            "profile": {"name": opts.profile, "uld": asdict(settings["uld"]),
                        "baselines": {m: asdict(c) for m, c in settings["baselines"].items()},
                        "retain_max": settings["retain_max"],
                        "retain_per_forget": settings["retain_per_forget"], "evaluation": settings["evaluation"],
                        "gates": settings["gates"]},
            "corpus": {**self.spec.as_dict(), "source": "TOFU author profiles (one document per author)"},
            "sizes": {"trained_authors": len(plan.trained_authors), "holdout_authors": len(plan.holdout_authors),
                      "trained_passages": len(self.records), "holdout_passages": len(self.holdout),
                      "vocab_size": len(self.tokenizer),
                      "base_parameters": int(sum(p.numel() for p in self.base.parameters()))},
            "takedowns": {split: [f"author-{a:03d}" for a in authors] for split, authors in plan.takedowns.items()},
            "base_training": self.base_meta,
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": self.device.type},
            "rows": self.rows,
        }

    def add_row(self, split: str, method: str, evidence: dict, oracle_auc: float | None, **extra) -> dict:
        from expunge_ml.gates import check_gates

        gates = [g.as_dict() for g in check_gates(evidence, self.settings["gates"])]
        row = {"split": split, "method": method, **summarise(evidence, gates, oracle_auc), **extra}
        self.rows.append(row)
        self.log(f"{split:8s} {method:14s} forget ROUGE-L {row['forget_rougeL']:.3f}  retain ratio "
                 f"{_fmt(row['retain_rougeL_ratio'])}  AUC {_fmt(row['mia_auc'])}  worst quant recovery "
                 f"{_fmt(row['worst_quant_recovery'])}  gates "
                 + ("passed" if row["gates_passed"] else "FAILED " + ", ".join(row["failed_gates"])))
        if self.opts.write:  # partial results survive an interrupted run
            write_outputs(self.report(final=False), Path(self.opts.out_dir))
        return row

    def passages(self, split: str, authors: Sequence[int]) -> Takedown:
        """The takedown's passages, with the retain set chosen as the pipeline chooses it."""
        from expunge_ml.corpus import select_retain, unseen_records

        settings = self.settings
        forget = documents_of(self.records, authors)
        forget_ids = {r.record_id for r in forget}
        kept = [r for r in self.records if r.record_id not in forget_ids]
        eval_max = int(settings["evaluation"]["retain_eval_max"])
        chosen = set(select_retain(kept + forget, forget_ids, settings["retain_max"], seed=0,
                                   per_forget=settings["retain_per_forget"], reserve=eval_max).retain_ids)
        # retained passages the methods did not train on, picked as the pipeline's `held_out_retain` picks them
        eval_retain = unseen_records(kept, chosen)[:eval_max]
        if not eval_retain:
            raise ValueError(f"{split}: every retained passage is in the retain set the methods train on ({len(chosen)}: "
                             f"profile retain_max {settings['retain_max']}, retain_per_forget "
                             f"{settings['retain_per_forget']:g}), so none is left to measure what they keep: "
                             "train more authors (n_retain_authors)")
        takedown = Takedown(split, forget, kept, [r for r in kept if r.record_id in chosen], eval_retain)
        self.log(f"{split}: {len(forget)} forget passages, {len(takedown.train_retain)} retain passages trained, "
                 f"{len(eval_retain)} retained passages evaluated")
        return takedown

    def evidence(self, takedown: Takedown, after, quantize: bool = True) -> dict:
        from expunge_ml.evidence import ServedModel, collect_evidence

        options = self.settings["evidence"]
        if not quantize:
            options = dataclasses.replace(options, quant_bits=(), quant_nf4=False)
        return collect_evidence(ServedModel(self.base), after, self.tokenizer, self.fmt, takedown.forget,
                                takedown.eval_retain, options=options, holdout=self.holdout)

    def takedown(self, split: str, authors: Sequence[int]) -> None:
        from expunge_ml.evidence import ServedModel

        takedown = self.passages(split, authors)
        oracle, oracle_meta = self.trained_model(f"retain_oracle[{split}]", takedown.kept)
        oracle_evidence = self.evidence(takedown, ServedModel(oracle), quantize=False)
        oracle_auc = (oracle_evidence["muse"]["unlearned"].get("mia") or {}).get("auc_min_k_pp")
        base_forget = oracle_evidence["metrics"]["base"]["forget"]["rougeL_recall"]
        if base_forget < self.opts.min_base_rougeL:
            raise BaseNotMemorised(f"the base continues the {split} documents with ROUGE-L {base_forget:.3f} < "
                                   f"{self.opts.min_base_rougeL}: not memorised, so a takedown would prove nothing "
                                   "(train longer: base_epochs / base_target_loss)")
        self.add_row(split, "base", self.evidence(takedown, ServedModel(self.base)), oracle_auc,
                     train_seconds=self.base_meta["train_seconds"])
        self.add_row(split, "retain_oracle", oracle_evidence, oracle_auc, train_seconds=oracle_meta["train_seconds"])
        del oracle
        for method in self.opts.methods:
            with peak_memory(self.device) as mem:
                t0 = time.perf_counter()
                served, extra = self.unlearn(method, takedown)
                seconds = time.perf_counter() - t0
            self.add_row(split, method, self.evidence(takedown, served), oracle_auc, train_seconds=seconds,
                         peak_mem_mb=mem.peak_mb, **extra)
            del served

    def unlearn(self, method: str, takedown: Takedown):
        """(the served model, the row's training details) after `method` takes the documents down."""
        from expunge_ml.evidence import ServedModel
        from expunge_ml.methods.registry import get_method
        from expunge_ml.methods.uld import build_assistant, ensemble_members, ensemble_weights, train_assistant
        from expunge_ml.uld_data import training_pairs

        if method != "uld":
            model = shared_copy(self.base).requires_grad_(True)  # run_loop gives what it trains new storage
            report = get_method(method).unlearn(model, self.tokenizer, self.fmt, takedown.forget, takedown.train_retain,
                                                self.settings["baselines"][method],
                                                idk_answers=self.data.idk_answers or None)
            return ServedModel(model.requires_grad_(False)), {"epochs": report.epochs,
                                                              "final_losses": report.final_losses}
        config = self.settings["uld"]
        forget_plus, retain_plus = training_pairs(takedown.forget, takedown.train_retain, config)
        assistants, reports = [], []
        for member in ensemble_members(config):
            assistant = build_assistant(self.base, member)
            reports.append(train_assistant(assistant, self.tokenizer, self.fmt, forget_plus, retain_plus, member))
            assistants.append(assistant)
        served = ServedModel(self.base, assistants, ensemble_weights(config.weight, len(assistants)), config.relative_top)
        return served, {"served_weight": config.weight, "epochs": reports[0].epochs,
                        "final_forget_nll": reports[0].forget_nll, "final_retain_kl": reports[0].retain_kl,
                        "n_forget_pairs": len(forget_plus), "n_retain_pairs": len(retain_plus)}


# ---------------------------------------------------------------------------------------- output


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" if pct else f"{value:.3f}"


def table_rows(report: dict) -> list[list[str]]:
    out = []
    for r in report["rows"]:
        quant = r["quantized"]
        out.append([
            r["split"], r["method"], _fmt(r["forget_rougeL"]), _fmt(r["forget_fact_recall"]), _fmt(r["verbmem_forget"]),
            _fmt(r["retain_rougeL_ratio"], pct=True), _fmt(r["mia_auc"]), _fmt(r["privleak_vs_oracle"], pct=True),
            *(_fmt(quant[p]["forget_rougeL"]) if p in quant else "—" for p in ("int8", "int4", "nf4")),
            _fmt(r["worst_quant_recovery"], pct=True), _fmt(r["fluency_ratio"]),
            "—" if r["method"] in ("base", "retain_oracle") else ("yes" if r["gates_passed"] else "no: " + ", ".join(r["failed_gates"])),
        ])
    return out


HEADER = ["split", "method", "forget ROUGE-L", "forget facts", "VerbMem", "retain ratio", "MIA AUC", "PrivLeak vs oracle",
          "int8 ROUGE-L", "int4 ROUGE-L", "NF4 ROUGE-L", "worst recovery", "fluency ratio", "profile gates passed"]


def print_table(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"document takedowns, profile {report['profile']['name']}")
    for name in HEADER:
        table.add_column(name)
    for cells in table_rows(report):
        table.add_row(*cells)
    (console or Console()).print(table)


NOTES_MARKER = "<!-- notes: kept when the benchmark rewrites this file -->"


def markdown(report: dict, notes: str = "") -> str:
    gates = ", ".join(f"{k} {v}" for k, v in report["profile"]["gates"].items())
    lines = [
        "# Document takedowns (MUSE-style, TOFU author profiles)", "",
        f"Command: `{report['command']}` — wall time {report['wall_seconds']:.0f} s on this machine.", "",
        "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER),
        *("| " + " | ".join(cells) + " |" for cells in table_rows(report)), "",
        "forget ROUGE-L: recall of the greedy continuation of each taken-down passage's opening words; forget facts: "
        "the share of the passages' names, places and numbers the continuations state; VerbMem: ROUGE-L F1 when "
        "half of the continuation is given too; retain ratio: the same ROUGE-L on retained passages the method "
        "did not train on, over the base's; MIA AUC: Min-K%++ on the forget passages against never-trained "
        "authors' passages; PrivLeak vs oracle: (AUC − the retain-only oracle's AUC) / the oracle's; int8/int4/NF4: "
        "forget ROUGE-L after quantizing every served weight; worst recovery: the largest share of the forgotten "
        f"ROUGE-L an attack brings back. Profile gates ({report['profile']['name']}, {REQUEST_TYPE}): {gates}.", "",
        f"Corpus: {report['sizes']['trained_authors']} documents trained ({report['sizes']['trained_passages']} passages "
        f"of {report['corpus']['passage_words']} words, the first {report['corpus']['prefix_words']} the prompt), "
        f"{report['sizes']['holdout_authors']} held out; base {report['sizes']['base_parameters']:,} parameters, "
        f"trained {report['base_training']['epochs']} epochs to loss {report['base_training']['final_loss']:.4f}.", "",
        NOTES_MARKER, notes.strip(), "",
    ]
    return "\n".join(lines)


def write_outputs(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{REPORT_STEM}.json", out_dir / f"{REPORT_STEM}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    notes = md_path.read_text().split(NOTES_MARKER, 1)[1] if md_path.exists() and NOTES_MARKER in md_path.read_text() else ""
    md_path.write_text(markdown(report, notes))
    return {"json": json_path, "markdown": md_path}
