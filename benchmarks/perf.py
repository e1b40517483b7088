"""`expunge benchmark perf`: what forgetting costs, as ratios measured in one run (median of repeats).

It reads a deployment home with a finished ULD ticket (its base, its assistant and its timings) and writes
`perf.json` + `perf.md`: serving cost of the composite over the base (P2), with stacked assistants (P6),
batched over per-example teacher-forced scoring (P5), the share of a request's wall time outside training and
evaluation (P3) and the wall time of `expunge status` (P7). P1 (ULD training over NPO's) and P4 (a batch of
erasures over one) are reported as not measured here: the first needs two trainings of one erasure (the TOFU
report times them), the second the batching the workflow does not have.
"""
from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

# The goals of each figure; P6's is for 20 stacked assistants (other stack sizes are reported for the trend).
GOALS = {"P1": ("<=", 0.33), "P2": ("<=", 1.3), "P3": ("<=", 0.05), "P4": ("<=", None), "P5": (">=", 5.0),
         "P6_n20": ("<=", 2.0), "P7": ("<=", 1.0)}


def goal_of(key: str) -> tuple[str, float | None]:
    return GOALS.get(key) or GOALS.get(key.split("_")[0]) or ("<=", None)


@dataclass(frozen=True)
class PerfOptions:
    home: str
    profile: str = "smollm2"
    ticket: str | None = None  # default: the newest ticket with a trained assistant
    repeats: int = 3
    new_tokens: int = 24
    stacked: tuple[int, ...] = (1, 5, 20)
    out_dir: str = "benchmarks/results"
    name: str = "perf"


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy initialisation are not the steady cost
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def decode(source, tokenizer, prompts: list[str], new_tokens: int) -> None:
    """Prefill plus exactly `new_tokens` greedy steps (no early stop): the same work for every model compared."""
    from expunge_ml.prompting import encode_prompt, pad_batch, pad_token_id, position_ids_from_mask

    ids, mask = pad_batch([encode_prompt(tokenizer, p) for p in prompts], pad_token_id(tokenizer), side="left")
    positions = position_ids_from_mask(mask)
    logits, past = source.step(ids, mask, positions, None, last_only=True)
    for _ in range(new_tokens):
        next_ids = logits[:, -1, :].argmax(dim=-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(next_ids)], dim=1)
        positions = positions[:, -1:] + 1
        logits, past = source.step(next_ids, mask, positions, past, last_only=True)


def pick_ticket(home: Path, ticket: str | None) -> Path:
    work = home / "work"
    if ticket:
        return work / ticket
    trained = [d for d in work.iterdir() if (d / "training.json").exists() and (d / "evidence.json").exists()
               and json.loads((d / "training.json").read_text()).get("adapter_dirs")]
    if not trained:
        raise ValueError(f"no finished ULD ticket under {work}: run one first (expunge run)")
    return max(trained, key=lambda d: (d / "evidence.json").stat().st_mtime)


def request_overhead(settings, ticket_dir: Path) -> dict[str, Any]:
    """P3: the share of the ticket's wall time (first step to its settled status) spent outside training and
    evaluation: Prefect, MLflow, the DB, data building, loading models."""
    from db import requests_repo

    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_dir.name)
        history = [(h.to_status, h.at) for h in request.status_history]
    started = next(at for status, at in history if status == "resolving")
    ended = next(at for status, at in reversed(history) if status in ("completed", "failed_gates", "needs_review"))
    wall = (ended - started).total_seconds()
    training = json.loads((ticket_dir / "training.json").read_text())["report"]["seconds"]
    evaluation = sum(json.loads((ticket_dir / "evidence.json").read_text()).get("seconds", {}).values())
    return {"value": round((wall - training - evaluation) / wall, 4), "wall_s": round(wall, 1),
            "training_s": round(training, 1), "evaluation_s": round(evaluation, 1)}


def status_seconds(home: Path, profile: str, repeats: int) -> float:
    """P7: wall time of `expunge status` in a fresh process, as a user runs it."""
    command = [sys.executable, "-m", "expunge.cli", "--home", str(home), "--profile", profile, "status"]
    return _median_seconds(lambda: subprocess.run(command, check=True, capture_output=True), repeats)


def run_perf(options: PerfOptions, log: Callable[[str], None] = print, command: str = "") -> dict[str, Any]:
    from expunge.settings import Settings
    from expunge_ml.generation import score_answers
    from expunge_ml.logits import CausalLMLogits, CompositeLogits
    from expunge_ml.methods.uld import load_assistant
    from expunge_ml.serving import load_base
    from tasks.context import settings_for
    from tasks.data import records_for_manifest
    from tasks.unlearn import prompt_format

    home = Path(options.home)
    settings = Settings(home=home, profile_name=options.profile)
    settings_for(str(home), options.profile)
    ticket_dir = pick_ticket(home, options.ticket)
    target = json.loads((ticket_dir / "target.json").read_text())
    training = json.loads((ticket_dir / "training.json").read_text())
    base, tokenizer = load_base(target["base_location"], target.get("base_weights_sha256"))
    fmt = prompt_format(target)
    forget = records_for_manifest(settings, target, str(ticket_dir / "forget_manifest.json"))
    prompts = [fmt.prompt(r.question) for r in forget]
    values: dict[str, Any] = {}

    key = settings.adapter_seal_key()
    assistant, config = load_assistant(base, Path(training["adapter_dirs"][0]), key)
    base_source = CausalLMLogits(base)
    for batch in (1, 8):
        chosen = (prompts * 8)[:batch]
        alone = _median_seconds(lambda: decode(base_source, tokenizer, chosen, options.new_tokens), options.repeats)
        composite = CompositeLogits(base, [assistant], [config.weight], config.relative_top)
        both = _median_seconds(lambda: decode(composite, tokenizer, chosen, options.new_tokens), options.repeats)
        values[f"P2_batch{batch}"] = {"value": round(both / alone, 3), "base_s": round(alone, 3),
                                      "composite_s": round(both, 3)}
        log(f"P2 batch {batch}: composite {both:.2f}s / base {alone:.2f}s")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stack: list = [assistant]
    for n in options.stacked:
        while len(stack) < n:  # the same adapter n times costs what n different erasures cost
            stack.append(load_assistant(base, Path(training["adapter_dirs"][0]), key)[0])
        composite = CompositeLogits(base, stack[:n], [config.weight / n] * n, config.relative_top)
        seconds = _median_seconds(lambda: decode(composite, tokenizer, prompts[:1], options.new_tokens),
                                  options.repeats)
        alone = _median_seconds(lambda: decode(base_source, tokenizer, prompts[:1], options.new_tokens),
                                options.repeats)
        values[f"P6_n{n}"] = {"value": round(seconds / alone, 3), "composite_s": round(seconds, 3)}
        log(f"P6 n={n}: {seconds / alone:.2f}× the base")
    peak_serving = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    pairs = [r.pair for r in forget] * 2
    batched = _median_seconds(lambda: score_answers(base_source, tokenizer, fmt, pairs, 16), options.repeats)
    single = _median_seconds(lambda: score_answers(base_source, tokenizer, fmt, pairs, 1), options.repeats)
    values["P5"] = {"value": round(single / batched, 3), "batched_s": round(batched, 3), "per_example_s": round(single, 3)}
    values["P3"] = request_overhead(settings, ticket_dir)
    values["P7"] = {"value": round(status_seconds(home, options.profile, options.repeats), 3)}
    values["P1"] = {"value": None, "why": "needs ULD and NPO trained on one erasure: see the TOFU report's timings"}
    values["P4"] = {"value": None, "why": "erasures are not batched into one run yet"}
    for key, entry in values.items():
        op, goal = goal_of(key)
        value = entry["value"]
        entry.update(goal=goal, met=None if value is None or goal is None else
                     (value <= goal if op == "<=" else value >= goal))
    return {
        "command": command or "expunge benchmark perf",
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "measured_at": datetime.now().isoformat(timespec="seconds"), "options": asdict(options),
        "base": {"location": target["base_location"], "parameters": sum(p.numel() for p in base.parameters())},
        "ticket": ticket_dir.name, "assistant_layers": config.n_layers,
        "peak_mem_mb": {"serving_with_stack": round(peak_serving, 1), "before_stack": round(rss_before, 1)},
        "values": dict(sorted(values.items())),
    }


def write_perf(result: dict[str, Any], out_dir: Path, name: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# The cost of forgetting", "",
             f"Command: `{result['command']}`, {result['measured_at']}; base {result['base']['location']} "
             f"({result['base']['parameters']:,} parameters), assistant of ticket {result['ticket']} "
             f"({result['assistant_layers']} layers); {result['machine']['platform']}, "
             f"{result['machine']['cpus']} torch threads. Ratios are medians of repeats in this one run.", "",
             "| figure | value | goal | met |", "|---|---|---|---|"]
    for key, entry in result["values"].items():
        value = "not measured" if entry["value"] is None else entry["value"]
        goal = "–" if entry["goal"] is None else f"{goal_of(key)[0]} {entry['goal']}"
        met = "–" if entry["met"] is None else ("yes" if entry["met"] else "**no**")
        lines.append(f"| {key} | {value} | {goal} | {met} |")
    lines += ["", f"Peak resident memory (MB): {result['peak_mem_mb']}.", "",
              "P1 ULD training ÷ NPO's; P2 composite generation ÷ base; P3 share of a request's wall time outside "
              "training and evaluation; P4 a batch of 5 erasures ÷ one; P5 per-example ÷ batched teacher-forced "
              "scoring; P6 N stacked assistants ÷ base; P7 `expunge status` seconds."]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
