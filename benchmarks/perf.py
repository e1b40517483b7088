"""`expunge benchmark perf`: what forgetting costs, as ratios measured in one run (median of repeats).

It reads a deployment home with a finished ULD ticket (its base, its assistant and its timings) and writes
`perf.json` + `perf.md`: ULD's training time over NPO's on that ticket's erasure (P1), serving cost of the
composite over the base (P2), with stacked assistants and with the one model consolidation leaves instead (P6),
batched over per-example teacher-forced scoring (P5),
the share of a request's wall time outside training and evaluation (P3) and the wall time of `expunge status`
(P7). P4 (a batch of erasures in one run over one erasure) is read from `expunge benchmark batching`'s result,
which drains erasures on the profile it names.

P1 trains both methods once each in this run (each takes minutes on a CPU), each in a fresh process
(`python -m benchmarks.perf train …`) so that its peak resident memory is its own. Each runs as the pipeline's
training task runs it (`tasks.unlearn`), on the ticket's forget and retain manifests, with the functions that
task calls: ULD at the profile's settings (`auto_unlearning`, `config_for`, `training_pairs`,
`_train_each_assistant`, and the weight selection where the profile has one), NPO at the profile's baseline
settings through the method registry (`config_for`, the method's `unlearn`, then the edited model saved and
hashed as `edit_model_weights` does). Timed: from the loaded base and records to the stored artefact; loading
the base and the records, the same for both, is not.
"""
from __future__ import annotations

import json
import logging
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

# The goals of each figure; P6's is for 20 stacked assistants (other stack sizes are reported for the trend).
GOALS = {"P1": ("<=", 0.33), "P2": ("<=", 1.3), "P3": ("<=", 0.05), "P4": ("<=", None), "P5": (">=", 5.0),
         "P6_n20": ("<=", 2.0), "P6_consolidated": ("<=", 1.05), "P7": ("<=", 1.0)}


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
    training: bool = True  # P1: ULD and NPO trained once each (minutes each); False reports it as not measured


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


# P1 compares ULD with NPO, the baseline the issue names; each is trained once (minutes each).
P1_METHODS = ("uld", "npo")
REPO = Path(__file__).resolve().parents[1]
LOG = logging.getLogger("benchmarks.perf")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(seconds: dict[str, float], part: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    seconds[part] = time.perf_counter() - start
    return out


def _train_uld(settings, target, spec, base, tokenizer, forget, retain, method, scratch: Path,
               seconds: dict[str, float]) -> dict[str, Any]:
    """The body of `tasks.unlearn.train_assistants` after loading, with the adapters sealed into `scratch`."""
    from expunge_ml.auto_settings import auto_unlearning, traits_of
    from expunge_ml.methods.registry import config_for
    from expunge_ml.uld_data import training_pairs
    from tasks.data import general_retain_records
    from tasks.unlearn import (_train_each_assistant, prompt_format, question_wordings, select_served_weight,
                               subject_terms, weight_selection_for)

    def data():
        unlearning, _ = auto_unlearning(settings.profile["unlearning"], traits_of(base, tokenizer))
        config = config_for(method, unlearning, spec.type)
        selection = weight_selection_for(unlearning, spec.type, config)
        wordings = (question_wordings(unlearning, config, forget, retain, settings.device)[0]
                    if config.question_paraphrases else {})
        general = general_retain_records(target, config.general_retain, config.seed) if config.general_retain else []
        pairs = training_pairs(forget, retain, config, fact_terms=subject_terms(spec), question_wordings=wordings,
                               general_records=general)
        return config, selection, wordings, pairs

    config, selection, wordings, (forget_pairs, retain_pairs) = _timed(seconds, "data", data)
    assistants, _, reports = _timed(seconds, "assistants", lambda: _train_each_assistant(
        base, tokenizer, prompt_format(target), forget_pairs, retain_pairs, config, scratch, LOG,
        settings.adapter_seal_key()))
    if selection:
        _timed(seconds, "weight_selection", lambda: select_served_weight(
            settings, target, spec, base, tokenizer, assistants, config, selection, forget, retain, wordings))
    return {"steps": sum(r.steps for r in reports), "loop_s": round(sum(r.seconds for r in reports), 2),
            "assistants": len(reports), "forget_pairs": len(forget_pairs), "retain_pairs": len(retain_pairs),
            "settings": {k: getattr(config, k) for k in ("epochs", "min_steps", "batch_size", "lr", "n_layers",
                                                         "lora_r", "target_forget_loss")}}


def _train_full_model(settings, target, spec, base, tokenizer, forget, retain, method, scratch: Path,
                      seconds: dict[str, float]) -> dict[str, Any]:
    """The body of `tasks.unlearn.edit_model_weights` after loading, with the edited model saved into `scratch`."""
    from expunge_ml.methods.registry import config_for, method_entry
    from expunge_ml.modeling import weights_fingerprint
    from tasks.unlearn import anchors_for, prompt_format

    config = config_for(method, settings.profile["unlearning"], spec.type)
    extra = {"anchors": anchors_for(spec)} if method == "whp" else {}
    report = _timed(seconds, "unlearn", lambda: method_entry(method).module.unlearn(
        base, tokenizer, prompt_format(target), forget, retain, config,
        progress=lambda epoch, losses: LOG.info("%s epoch %d: %s", method, epoch, losses), **extra))

    def save():
        base.save_pretrained(scratch / "model")
        tokenizer.save_pretrained(scratch / "model")
        return weights_fingerprint(scratch / "model")

    _timed(seconds, "save", save)
    return {"steps": report.steps, "loop_s": round(report.seconds, 2), "forget_pairs": len(forget),
            "retain_pairs": len(retain), "settings": {k: getattr(config, k) for k in ("epochs", "batch_size", "lr")}}


def train_as_shipped(home: str, profile: str, ticket: str, method: str) -> dict[str, Any]:
    """One training of `method` on `ticket`'s erasure as the pipeline's training task runs it (in this process):
    its seconds by part, its steps and this process's peak resident memory (base and records loaded included)."""
    from expunge_ml.methods.registry import ASSISTANT, method_entry
    from tasks.context import read_json, request_spec, settings_for
    from tasks.data import records_for_manifest
    from tasks.unlearn import target_base

    settings = settings_for(home, profile)
    resolved = read_json(settings.ticket_dir(ticket) / "resolved.json")
    target = read_json(resolved["target_path"])
    spec = request_spec(settings, ticket)
    forget = records_for_manifest(settings, target, resolved["forget_manifest"])
    retain = records_for_manifest(settings, target, resolved["retain_manifest"])
    base, tokenizer = target_base(target, settings)
    loaded_mb = _peak_rss_mb()
    train = _train_uld if method_entry(method).trains == ASSISTANT else _train_full_model
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="expunge-perf-") as scratch:
        facts = train(settings, target, spec, base, tokenizer, forget, retain, method, Path(scratch), seconds)
    return {"method": method, "seconds": round(sum(seconds.values()), 2),
            "parts_s": {k: round(v, 2) for k, v in seconds.items()}, **facts,
            # A baseline edits a plain target only; on a composite target the product refuses it.
            "target_serves_assistants": bool(target.get("prior_assistants")),
            "peak_mem_mb": round(_peak_rss_mb(), 1), "loaded_mem_mb": round(loaded_mb, 1),
            "torch_threads": torch.get_num_threads()}


def training_cost(home: str, profile: str, ticket: str, method: str) -> dict[str, Any]:
    """`train_as_shipped` in a fresh process: its peak memory is that training's alone, not this process's."""
    with tempfile.TemporaryDirectory(prefix="expunge-perf-") as scratch:
        out = Path(scratch) / "training.json"
        # The child's output goes to stderr: stdout carries the report this command prints.
        subprocess.run([sys.executable, "-m", "benchmarks.perf", "train", home, profile, ticket, method, str(out)],
                       check=True, cwd=REPO, stdout=sys.__stderr__.fileno())
        return json.loads(out.read_text())


def training_ratio(home: Path, profile: str, ticket: str, log: Callable[[str], None],
                   train: Callable[[str, str, str, str], dict] = training_cost) -> tuple[dict, dict]:
    """P1 (ULD's training seconds ÷ NPO's, one training each, by `train`) and each training's facts."""
    trainings = {}
    for method in P1_METHODS:
        trainings[method] = train(str(home), profile, ticket, method)
        log(f"P1 {method}: {trainings[method]['seconds']:.1f}s, peak {trainings[method]['peak_mem_mb']:.0f} MB")
    uld, npo = (trainings[m] for m in P1_METHODS)
    return {"value": round(uld["seconds"] / npo["seconds"], 3), "uld_s": uld["seconds"], "npo_s": npo["seconds"],
            "loops_ratio": round(uld["loop_s"] / npo["loop_s"], 3), "repeats": 1}, trainings


def consolidated_cost(base, base_source, tokenizer, prompts: list[str], options: PerfOptions) -> dict[str, Any]:
    """Generation with a model as consolidation makes it (`expunge_ml.consolidation`: LoRA on every linear layer of a
    copy of the base, merged) ÷ the base. Its cost does not depend on what the LoRA learned, so it is not trained."""
    from expunge_ml.consolidation import ConsolidationConfig, student_of
    from expunge_ml.logits import CausalLMLogits

    merged = CausalLMLogits(student_of(base, ConsolidationConfig()).merge_and_unload().eval())
    seconds = _median_seconds(lambda: decode(merged, tokenizer, prompts, options.new_tokens), options.repeats)
    alone = _median_seconds(lambda: decode(base_source, tokenizer, prompts, options.new_tokens), options.repeats)
    return {"value": round(seconds / alone, 3), "consolidated_s": round(seconds, 3), "base_s": round(alone, 3)}


def batching_figure(path: Path) -> dict[str, Any]:
    """P4 from `expunge benchmark batching`'s result (its own run: a batch of drains on the profile it names)."""
    if not path.exists():
        return {"value": None, "why": f"no {path.name}: run `expunge benchmark batching`"}
    batching = json.loads(path.read_text())
    return {"value": batching["batch_over_one"], "from": f"{path.name}: {batching['command']}, {batching['date']}",
            "tickets": len(batching["options"]["people"]), "profile": batching["options"]["profile"]}


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
    values["P6_consolidated"] = consolidated_cost(base, base_source, tokenizer, prompts[:1], options)
    log(f"P6 consolidated: {values['P6_consolidated']['value']:.2f}× the base")
    pairs = [r.pair for r in forget] * 2
    batched = _median_seconds(lambda: score_answers(base_source, tokenizer, fmt, pairs, 16), options.repeats)
    single = _median_seconds(lambda: score_answers(base_source, tokenizer, fmt, pairs, 1), options.repeats)
    values["P5"] = {"value": round(single / batched, 3), "batched_s": round(batched, 3), "per_example_s": round(single, 3)}
    values["P3"] = request_overhead(settings, ticket_dir)
    values["P7"] = {"value": round(status_seconds(home, options.profile, options.repeats), 3)}
    trainings: dict[str, Any] = {}
    if options.training:
        values["P1"], trainings = training_ratio(home, options.profile, ticket_dir.name, log)
    else:
        values["P1"] = {"value": None, "why": "not asked for (--no-training)"}
    values["P4"] = batching_figure(Path(options.out_dir) / "batching.json")
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
        "peak_mem_mb": {"serving_with_stack": round(peak_serving, 1), "before_stack": round(rss_before, 1),
                        **{f"training_{m}": t["peak_mem_mb"] for m, t in trainings.items()}},
        "training": trainings,
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
             f"{result['machine']['cpus']} torch threads. Ratios are medians of repeats in this one run (P1: one training of each).", "",
             "| figure | value | goal | met |", "|---|---|---|---|"]
    for key, entry in result["values"].items():
        value = "not measured" if entry["value"] is None else entry["value"]
        goal = "–" if entry["goal"] is None else f"{goal_of(key)[0]} {entry['goal']}"
        met = "–" if entry["met"] is None else ("yes" if entry["met"] else "**no**")
        lines.append(f"| {key} | {value} | {goal} | {met} |")
    p4 = result["values"].get("P4") or {}
    if p4.get("from"):
        lines += ["", f"P4 is read from {p4['from']} (profile {p4['profile']}, {p4['tickets']} tickets); see batching.md."]
    trainings = result.get("training") or {}
    if trainings:
        lines += ["", "P1 is one training of each method in this run (each takes minutes), each in its own fresh "
                  "process, as the pipeline's training task runs it on this ticket's forget and retain sets at the "
                  "profile's settings; timed from the loaded base and records to the stored artefact. The training "
                  "loops' own clocks alone (no data building, reference log-probs or saving) give "
                  f"{result['values']['P1']['loops_ratio']}.", "",
                  "| training | seconds | parts (s) | steps | settings | peak MB | MB after loading |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {m} | {t['seconds']} | {t['parts_s']} | {t['steps']} | {t['settings']} | {t['peak_mem_mb']} "
                  f"| {t['loaded_mem_mb']} |" for m, t in trainings.items()]
    lines += ["", f"Peak resident memory (MB): {result['peak_mem_mb']}. Serving: this process's maximum resident "
              "set (getrusage) before and after stacking assistants; training: each training process's maximum, "
              "the loaded base and records included.", "",
              "P1 ULD training ÷ NPO's; P2 composite generation ÷ base; P3 share of a request's wall time outside "
              "training and evaluation; P4 a batch of 5 erasures ÷ one; P5 per-example ÷ batched teacher-forced "
              "scoring; P6 N stacked assistants ÷ base (consolidated: the one model consolidation leaves ÷ base); P7 "
              "`expunge status` seconds."]
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


if __name__ == "__main__":  # `python -m benchmarks.perf train HOME PROFILE TICKET METHOD OUT`: one P1 training
    _, command, *args = sys.argv
    if command != "train" or len(args) != 5:
        sys.exit("usage: python -m benchmarks.perf train HOME PROFILE TICKET METHOD OUT.json")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    Path(args[4]).write_text(json.dumps(train_as_shipped(*args[:4]), indent=2) + "\n")
