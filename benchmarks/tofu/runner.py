"""Runs the TOFU benchmark: the base, then per split its oracle, retrained references and every method."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from expunge_ml.modeling import shared_copy
from expunge_ml.tofu import load_tofu

from ..model_cache import load_or_train_model, load_or_train_tokenizer, memory_method, peak_memory
from .evaluation import acceptance, evaluate_source, rank_correlation, retrain_method
from .options import TofuBenchOptions
from .plan import SplitSpec, baseline_config, make_plan, split_specs, uld_pairs
from .report import write_outputs


def run_tofu_benchmark(opts: TofuBenchOptions, command: str = "", log: Callable[[str], None] | None = None) -> dict:
    """Run the benchmark; returns the report dict (and writes it + Markdown + plot when opts.write)."""
    import torch

    opts.validate()
    started = time.perf_counter()
    if log is None:
        log = (lambda _msg: None) if opts.quiet else (lambda msg: print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True))
    previous_threads = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        run = TofuRun(opts, command, log, started)
        for spec in split_specs(run.plan, opts):
            run.run_split(spec)
        report = run.report(final=True)
        if opts.write:
            write_outputs(report, Path(opts.out_dir))
        return report
    finally:
        torch.set_num_threads(previous_threads)  # callers (e.g. a test session) keep their setting


class TofuRun:
    """One run's shared state: the data, the plan, the tokenizer and base, and the rows measured so far."""

    def __init__(self, opts: TofuBenchOptions, command: str, log: Callable[[str], None], started: float) -> None:
        from expunge_ml.devices import resolve_device
        from expunge_ml.logits import CausalLMLogits
        from expunge_ml.prompting import PromptFormat

        self.opts, self.command, self.log, self.started = opts, command, log, started
        self.started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.device = resolve_device(opts.device)
        self.data = load_tofu(opts.data_dir)
        self.plan = make_plan(self.data, opts)
        self.fmt = PromptFormat()
        self.cache = Path(opts.cache_dir).expanduser()
        self.cache.mkdir(parents=True, exist_ok=True)
        log(f"authors: {len(self.plan.authors)} ({len(self.plan.retain_authors)} retain + forget "
            f"{self.plan.forget_authors}); base pairs {len(self.plan.base_pairs)} (world knowledge "
            f"{len(self.plan.world_pairs)})")
        self.tokenizer, self.tokenizer_key = load_or_train_tokenizer(opts, self.plan.base_pairs, self.cache, log)
        log(f"device: {self.device}")
        self.base, self.base_meta = self.trained_model("base", self.plan.base_pairs, opts)
        self.base_source = CausalLMLogits(self.base)
        self.base_utility: dict = {}
        self.rows: list[dict] = []
        self.rng = random.Random(opts.seed)  # the ULD retain rows, drawn split after split

    def trained_model(self, role: str, pairs, opts: TofuBenchOptions):
        model, meta = load_or_train_model(role, pairs, self.tokenizer, self.tokenizer_key, opts, self.cache, self.log,
                                          self.device)
        return model.requires_grad_(False), meta

    def evaluate(self, source, forget, spec: SplitSpec, utility_cache: dict | None = None) -> dict:
        return evaluate_source(source, self.tokenizer, self.fmt, forget, spec.eval_plan, self.opts, utility_cache)

    def add_row(self, method: str, split: str, ev: dict, oracle_ratios: list[float], seconds: float, mem: float,
                **extra) -> dict:
        from expunge_ml.metrics import forget_quality

        fq = forget_quality(ev["forget_truth_ratios"], oracle_ratios)
        row = {
            "method": method, "split": split, "forget_quality": fq, "model_utility": ev["model_utility"],
            "forget_rougeL": ev["forget_rougeL"], "forget_prob": ev["forget_prob"],
            "forget_truth_ratio_score": ev["forget_truth_ratio_score"],
            "forget_tr_rank_corr_oracle": rank_correlation(ev["forget_truth_ratios"], oracle_ratios),
            "train_seconds": seconds, "peak_mem_mb": mem, "utility": ev["utility"], **extra,
        }
        self.log(f"{split:9s} {method:14s} FQ {fq:.3g}  MU {ev['model_utility']:.4f}  forget ROUGE-L "
                 f"{ev['forget_rougeL']:.3f}  train {seconds:.1f}s  mem {mem:.0f}MB")
        self.rows.append(row)
        if self.opts.write:  # partial results survive an interrupted run
            write_outputs(self.report(final=False), Path(self.opts.out_dir))
        return row

    def run_split(self, spec: SplitSpec) -> None:
        forget = self.plan.records(self.data, spec.forget_authors)
        retain = self.plan.records(self.data, spec.retain_authors)  # every benchmark author not forgotten here
        oracle_pairs = [r.pair for r in self.plan.records(self.data, spec.oracle_authors)] + self.plan.world_pairs
        oracle_ratios = self.reference_rows(spec, forget, oracle_pairs)
        base_ev = self.evaluate(self.base_source, forget, spec, self.base_utility)
        meta = self.base_meta
        row = self.add_row("base", spec.name, base_ev, oracle_ratios, meta["train_seconds"], meta["peak_mem_mb"],
                           cached=meta.get("cached", False), epochs=meta["epochs"], steps=meta["steps"])
        self.quantization_attack(row, self.served(), forget, spec, oracle_ratios)
        for method in self.opts.methods:
            if method == "uld":
                self.uld_row(spec, forget, retain, oracle_ratios)
            else:
                self.baseline_row(method, spec, forget, retain, oracle_ratios)

    def reference_rows(self, spec: SplitSpec, forget, oracle_pairs) -> list[float]:
        """The retain-only oracle's row and the retrained rows; returns the oracle's forget truth ratios."""
        from expunge_ml.logits import CausalLMLogits

        oracle, meta = self.trained_model(f"retain_oracle[{spec.name}]", oracle_pairs, self.opts)
        ev = self.evaluate(CausalLMLogits(oracle), forget, spec)
        oracle_ratios = ev["forget_truth_ratios"]
        self.add_row("retain_oracle", spec.name, ev, oracle_ratios, meta["train_seconds"], meta["peak_mem_mb"],
                     cached=meta.get("cached", False), epochs=meta["epochs"], steps=meta["steps"])
        del oracle
        # Retraining from another init seed is the ideal unlearner; its forget quality against the oracle
        # is the most any method can be expected to reach at this scale (the KS test also sees seed noise).
        for seed in self.opts.retrain_seeds:
            reseeded, meta = self.trained_model(f"retrain[{spec.name}, seed {seed}]", oracle_pairs,
                                                dataclasses.replace(self.opts, seed=seed))
            ev = self.evaluate(CausalLMLogits(reseeded), forget, spec)
            self.add_row(retrain_method(seed), spec.name, ev, oracle_ratios, meta["train_seconds"], meta["peak_mem_mb"],
                         cached=meta.get("cached", False), epochs=meta["epochs"], steps=meta["steps"])
            del reseeded
        return oracle_ratios

    def served(self, model=None, assistants=(), weight: float = 0.0, relative_top: float = 0.0):
        from expunge_ml.evidence import ServedModel
        from expunge_ml.methods.uld import ensemble_weights

        weights = ensemble_weights(weight, len(assistants)) if assistants else []
        return ServedModel(self.base if model is None else model, list(assistants), weights, relative_top)

    def uld_row(self, spec: SplitSpec, forget, retain, oracle_ratios) -> None:
        from expunge_ml.methods.uld import build_assistant, ensemble_members, train_assistant

        config = self.opts.uld
        forget_plus, retain_plus = uld_pairs(forget, retain, self.opts, self.rng)
        assistants, reports = [], []
        with peak_memory(self.device) as mem:
            t0 = time.perf_counter()
            for member in ensemble_members(config):
                assistant = build_assistant(self.base, member)
                reports.append(train_assistant(
                    assistant, self.tokenizer, self.fmt, forget_plus, retain_plus, member,
                    progress=lambda e, n, k: self.log(f"  uld epoch {e}: forget NLL {n:.3f} retain KL {k:.3f}")))
                assistants.append(assistant)
            seconds = time.perf_counter() - t0
        served = self.served(assistants=assistants, weight=config.weight, relative_top=config.relative_top)
        ev = self.evaluate(served.source(), forget, spec)
        report = reports[0]
        row = self.add_row("uld", spec.name, ev, oracle_ratios, seconds, mem.peak_mb, epochs=report.epochs,
                           steps=report.steps, final_losses={"forget_nll": report.forget_nll,
                                                             "retain_kl": report.retain_kl},
                           config=asdict(config), n_forget_plus=len(forget_plus), n_retain_plus=len(retain_plus))
        self.quantization_attack(row, served, forget, spec, oracle_ratios)

    def baseline_row(self, method: str, spec: SplitSpec, forget, retain, oracle_ratios) -> None:
        from expunge_ml.logits import CausalLMLogits
        from expunge_ml.methods.registry import get_method

        config = baseline_config(method, self.opts)
        with peak_memory(self.device) as mem:
            t0 = time.perf_counter()
            model = shared_copy(self.base).requires_grad_(True)  # run_loop gives what it trains new storage
            try:
                report = get_method(method).unlearn(
                    model, self.tokenizer, self.fmt, forget, retain, config, idk_answers=self.data.idk_answers or None,
                    progress=lambda e, parts: self.log(f"  {method} epoch {e}: "
                                                       + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())))
                error = None
            except FloatingPointError as exc:  # a diverging baseline is a result, not a crash
                report, error = None, str(exc)
            seconds = time.perf_counter() - t0
        model.requires_grad_(False)
        ev = self.evaluate(CausalLMLogits(model), forget, spec)
        row = self.add_row(method, spec.name, ev, oracle_ratios, seconds, mem.peak_mb,
                           epochs=report.epochs if report else None, steps=report.steps if report else None,
                           final_losses=report.final_losses if report else None, error=error,
                           config=dataclasses.asdict(config))
        self.quantization_attack(row, self.served(model), forget, spec, oracle_ratios)

    def quantization_attack(self, row: dict, served, forget, spec: SplitSpec, oracle_ratios) -> None:
        """Quantize every served weight (RTN at each bit width, NF4 if asked) and evaluate again (Zhang et al. 2024)."""
        from expunge_ml.metrics import forget_quality

        opts = self.opts
        if row["method"] not in opts.quant_methods:
            return
        for precision, group_size, build in served.quantization_attacks(opts.quant_bits, opts.quant_group_size,
                                                                        opts.quant_nf4):
            ev = self.evaluate(build().source(), forget, spec)
            row.setdefault("quantized", {})[precision] = {
                "forget_rougeL": ev["forget_rougeL"], "forget_prob": ev["forget_prob"],
                "forget_quality": forget_quality(ev["forget_truth_ratios"], oracle_ratios),
                "model_utility": ev["model_utility"], "group_size": group_size,
            }
            self.log(f"{row['split']:9s} {row['method']:14s} {precision}: forget ROUGE-L {ev['forget_rougeL']:.3f}"
                     f"  P(answer) {ev['forget_prob']:.3f}  MU {ev['model_utility']:.4f}")

    def report(self, final: bool) -> dict[str, Any]:
        import torch

        plan, rows = self.plan, self.rows
        split_names = list(dict.fromkeys(r["split"] for r in rows))
        ratio = {}
        for split in split_names:
            by = {r["method"]: r for r in rows if r["split"] == split}
            if "uld" in by and "npo" in by and by["npo"]["train_seconds"] > 0:
                ratio[split] = by["uld"]["train_seconds"] / by["npo"]["train_seconds"]
        return {
            "command": self.command, "config": asdict(self.opts), "started_at": self.started_at,
            "wall_seconds": time.perf_counter() - self.started, "complete": final,
            "sizes": {
                "authors": plan.authors, "retain_authors": plan.retain_authors, "forget_authors": plan.forget_authors,
                "base_train_pairs": len(plan.base_pairs), "world_knowledge_pairs": len(plan.world_pairs),
                "retain_eval": len(plan.retain_eval), "real_authors_eval": len(plan.real_eval),
                "world_facts_eval": len(plan.world_eval), "vocab_size": len(self.tokenizer),
                "base_parameters": int(sum(p.numel() for p in self.base.parameters())),
            },
            "base_training": self.base_meta,
            "memory_method": memory_method(self.device),
            "uld_npo_train_time_ratio": ratio,
            "acceptance": acceptance(rows, split_names),
            "environment": {
                "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(), "platform": platform.platform(), "device": self.device.type,
                "accelerator": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            },
            "rows": rows,
        }
