"""Train the unlearning for a resolved request, as its method trains: assistants that the served model
subtracts from the target (ULD), or an edited copy of the target's weights (the baselines)."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task

from expunge_ml.methods.registry import ASSISTANT, FULL_MODEL, config_for, method_entry
from expunge_ml.methods.uld import ULDConfig
from expunge_ml.modeling import load_causal_lm, weights_fingerprint
from expunge_ml.prompting import DEFAULT_PROMPT_TEMPLATE, PromptFormat
from expunge_ml.serving import Adapter, load_base, served_model
from tasks.context import read_json, request_spec, settings_for, write_json
from tasks.contracts import ResolvedRequest, TrainedUnlearning
from tasks.data import general_retain_records, records_for_manifest
from tasks.resume import training_inputs_fingerprint


def target_base(target_info: dict, settings):
    """(model, tokenizer) of the target's base, checked against the weight hash the registry pinned."""
    return load_base(target_info["base_location"], target_info.get("base_weights_sha256"),
                     device=settings.device, dtype=settings.dtype)


def prior_adapters(target_info: dict, key: bytes) -> list[Adapter]:
    """The assistants the target already serves (earlier erasures), each at its registered w; `key` opens them
    (the deployment's `adapter_seal_key`)."""
    return [Adapter(a["dir"], a.get("weight"), key) for a in target_info.get("prior_assistants", [])]


def prompt_format(target_info: dict) -> PromptFormat:
    return PromptFormat(template=target_info.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE)


def anchors_for(spec) -> dict[str, str]:
    """WHP's anchored terms → generic stand-ins: the subject's own names and identifiers."""
    generic = {term: "the person" for term in [*spec.subject.names, *spec.subject.aliases]}
    generic.update({term: "their details" for term in spec.subject.identifiers})
    return generic


@task(name="unlearn-full-model")
def edit_model_weights(home: str, profile: str, ticket_id: str, resolved: ResolvedRequest,
                       method: str) -> TrainedUnlearning:
    """A method that edits a copy of the base itself (GA, NPO, …); the result is a full model version."""
    settings = settings_for(home, profile)
    logger = get_run_logger()
    target_info = read_json(resolved.target_path)
    if target_info.get("prior_assistants"):
        from expunge.requests import RequestError

        raise RequestError("method_needs_plain_model",
                           f"{method} edits model weights; the target is a ULD composite — use method uld")
    spec = request_spec(settings, ticket_id)
    forget = records_for_manifest(settings, target_info, resolved.forget_manifest)
    retain = records_for_manifest(settings, target_info, resolved.retain_manifest)
    config = config_for(method, settings.profile["unlearning"], spec.type)
    model, tokenizer = target_base(target_info, settings)
    extra = {"anchors": anchors_for(spec)} if method == "whp" else {}
    report = method_entry(method).module.unlearn(
        model, tokenizer, prompt_format(target_info), forget, retain, config,
        progress=lambda epoch, losses: logger.info("epoch %d: %s", epoch, losses), **extra,
    )
    model_dir = settings.ticket_dir(ticket_id) / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    trained = TrainedUnlearning(
        method=method, trains=FULL_MODEL, config=asdict(config), report=asdict(report),
        forget_pairs=len(forget), retain_pairs=len(retain),
        model_dir=str(model_dir), weights_sha256=weights_fingerprint(model_dir),
        prompt_template=prompt_format(target_info).template,
        inputs_fingerprint=training_inputs_fingerprint(settings, ticket_id, resolved, method),
    )
    write_json(settings.ticket_dir(ticket_id) / "training.json", trained.as_json())
    logger.info("%s finished in %.1fs (%d steps)", method, report.seconds, report.steps)
    return trained


def weight_selection_for(unlearning: dict, request_type: str, config: ULDConfig) -> dict | None:
    """The profile's `unlearning.weight_selection` for this request type, checked before any training
    (`expunge_ml.weight_selection.selection_settings`); None where w stays the profile's."""
    from expunge_ml.weight_selection import selection_settings

    return selection_settings(unlearning, request_type, config.weight)


def subject_terms(spec) -> list[str]:
    """What the request names the subject by: the facts ULD's fact-only loss remembers (kept in memory only)."""
    return [*spec.subject.names, *spec.subject.aliases, *spec.subject.identifiers]


def question_wordings(unlearning: dict, config: ULDConfig, forget, retain, device: str = "cpu") -> tuple[dict, str]:
    """Other wordings of the forget and retain questions for `config.question_paraphrases`, written by the
    profile's `unlearning.paraphraser` (a local causal LM directory), and that LM's weight hash.

    Kept in memory only: the wordings are forget-set text, so they never reach a log, a result or an artefact."""
    from expunge_ml.paraphrase import wordings_by_question

    location = unlearning.get("paraphraser") or ""
    if not location or not Path(location).is_dir():
        raise ValueError(f"ULD question_paraphrases = {config.question_paraphrases} needs the profile's "
                         f"unlearning.paraphraser: a local causal LM directory (got {location!r}; "
                         "`expunge benchmark export-smollm2 DIR` writes SmolLM2-135M-Instruct)")
    model, tokenizer = load_causal_lm(location, device=device)
    items = [(r.question, r.subject) for r in [*forget, *retain]]
    wordings = wordings_by_question(model, tokenizer, items, config.question_paraphrases, seed=config.seed)
    return wordings, weights_fingerprint(Path(location))


def select_served_weight(settings, target_info: dict, spec, base, tokenizer, assistants: list, config: ULDConfig,
                         selection: dict, forget, retain, wordings: dict):
    """w for this erasure's assistants (`expunge_ml.weight_selection`), scored on the served composite: the
    earlier erasures' assistants at their own w plus this erasure's at each candidate's shares. The erased
    side is the forget records' training questions, the retained side per `selection["retained"]`."""
    import dataclasses

    from expunge_ml.evidence import ServedModel, probes_for
    from expunge_ml.methods.uld import ensemble_weights
    from expunge_ml.weight_selection import select_weight, training_question_probes
    from tasks.data import selection_retain

    prior = served_model(base, prior_adapters(target_info, settings.adapter_seal_key()))
    evaluation = settings.profile["evaluation"]

    def composite_at(weight: float):
        return ServedModel(base, [*prior.assistants, *assistants],
                           [*prior.weights, *ensemble_weights(weight, len(assistants))], config.relative_top).source()

    erased = training_question_probes(forget, wordings, spec.subject.identifiers)
    if selection["retained"] == "held_out":
        limit = int(evaluation["retain_eval_max"])
        validation = selection_retain(target_info, {r.record_id for r in forget}, {r.record_id for r in retain},
                                      limit, limit)
        retained = probes_for(validation)  # every probe kind: these records are in no evaluation
    else:
        retained = training_question_probes(retain, wordings)
    chosen = select_weight(
        prior.source(), composite_at, tokenizer, prompt_format(target_info), erased, retained,
        selection["candidates"], config.weight, min_retained=selection["min_retained"],
        max_new_tokens=int(evaluation["max_new_tokens"]), batch_size=int(evaluation["batch_size"]))
    return dataclasses.replace(chosen, retained_probes=selection["retained"])


def save_sealed(assistant, config: ULDConfig, adapter_dir: Path, seal_key: bytes) -> Path:
    """The adapter written to a private scratch directory, and only its sealed form kept in `adapter_dir`."""
    import shutil
    import tempfile

    from expunge_ml.methods.uld import save_assistant
    from expunge_ml.sealed import seal_directory

    shutil.rmtree(adapter_dir, ignore_errors=True)  # a run taken up again trains afresh
    with tempfile.TemporaryDirectory(prefix="expunge-assistant-") as scratch:
        seal_directory(save_assistant(assistant, config, Path(scratch)), adapter_dir, seal_key)
    return adapter_dir


PROGRESS_EVERY_SECONDS = 10


def epoch_progress(logger, index: int, n_members: int, member: ULDConfig, n_forget: int):
    """A progress callback for `train_assistant`: a line every PROGRESS_EVERY_SECONDS (and at the first and last
    epoch), however fast the epochs, with the forget NLL against its target and the time left at this pace."""
    from expunge_ml.methods.uld import planned_epochs

    started, last_line, epochs = time.perf_counter(), 0.0, planned_epochs(member, n_forget)

    def report(epoch: int, nll: float, kl: float) -> None:
        nonlocal last_line
        elapsed = time.perf_counter() - started
        if epoch not in (1, epochs) and elapsed - last_line < PROGRESS_EVERY_SECONDS:
            return
        last_line = elapsed
        logger.info("assistant %d/%d, epoch %d/%d: forget NLL %.4f (target %g), retain KL %.4f; %.0fs, "
                    "at most %.0fs left", index + 1, n_members, epoch, epochs, nll,
                    member.target_forget_loss, kl, elapsed, elapsed / epoch * (epochs - epoch))

    return report


def _train_each_assistant(base, tokenizer, fmt: PromptFormat, forget_pairs, retain_pairs, config: ULDConfig,
                          out_dir: Path, logger, seal_key: bytes) -> tuple[list, list[str], list]:
    """One assistant per member of `config.assistants` (seeds differ): (assistants, adapter dirs, reports).
    Each is stored sealed (`expunge_ml.sealed`): it remembers the forget set."""
    from expunge_ml.methods.uld import build_assistant, ensemble_members, train_assistant

    assistants, adapter_dirs, reports = [], [], []
    members = ensemble_members(config)
    for index, member in enumerate(members):
        assistant = build_assistant(base, member)
        progress = epoch_progress(logger, index, len(members), member, len(forget_pairs))
        reports.append(train_assistant(assistant, tokenizer, fmt, forget_pairs, retain_pairs, member, progress))
        name = "assistant" if index == 0 else f"assistant_{index + 1}"
        adapter_dirs.append(str(save_sealed(assistant, member, out_dir / name, seal_key)))
        assistants.append(assistant)
    return assistants, adapter_dirs, reports


@task(name="train-assistants")
def train_assistants(home: str, profile: str, ticket_id: str, resolved: ResolvedRequest,
                     method: str) -> TrainedUnlearning:
    """A method that trains assistants to subtract from the target (ULD); the base's weights stay as they are."""
    settings = settings_for(home, profile)
    return _train_uld(settings, settings.ticket_dir(ticket_id), request_spec(settings, ticket_id), resolved, method,
                      training_inputs_fingerprint(settings, ticket_id, resolved, method))


@task(name="train-batch-assistants")
def train_batch_assistants(home: str, profile: str, batch_id: str, ticket_ids: list[str], resolved: ResolvedRequest,
                           method: str) -> TrainedUnlearning:
    """One assistant for a batch's tickets: `resolved` is the union of their forget (and retain) sets, the subject
    terms the union of theirs; written to the batch's own work directory."""
    from tasks.batch import merged_spec

    settings = settings_for(home, profile)
    spec = merged_spec([request_spec(settings, ticket_id) for ticket_id in ticket_ids])
    return _train_uld(settings, settings.ticket_dir(batch_id), spec, resolved, method,
                      training_inputs_fingerprint(settings, ticket_ids, resolved, method))


def _train_uld(settings, work_dir: Path, spec, resolved: ResolvedRequest, method: str,
               inputs_fingerprint: str) -> TrainedUnlearning:
    from expunge_ml.auto_settings import auto_unlearning, traits_of
    from expunge_ml.methods.uld import convergence, ensemble_weights
    from expunge_ml.uld_data import training_pairs

    logger = get_run_logger()
    target_info = read_json(resolved.target_path)
    forget = records_for_manifest(settings, target_info, resolved.forget_manifest)
    retain = records_for_manifest(settings, target_info, resolved.retain_manifest)
    base, tokenizer = target_base(target_info, settings)
    unlearning, derived = auto_unlearning(settings.profile["unlearning"], traits_of(base, tokenizer))
    if derived:
        logger.info("settings derived from the target: %s", derived["values"])
    config = config_for(method, unlearning, spec.type)
    selection = weight_selection_for(unlearning, spec.type, config)
    wordings, paraphraser_sha256 = ({}, None)
    if config.question_paraphrases:
        wordings, paraphraser_sha256 = question_wordings(unlearning, config, forget, retain, settings.device)
        logger.info("%d question wordings written for %d questions", sum(map(len, wordings.values())), len(wordings))
    general = general_retain_records(target_info, config.general_retain, config.seed) if config.general_retain else []
    forget_pairs, retain_pairs = training_pairs(forget, retain, config, fact_terms=subject_terms(spec),
                                                question_wordings=wordings, general_records=general)
    assistants, adapter_dirs, reports = _train_each_assistant(
        base, tokenizer, prompt_format(target_info), forget_pairs, retain_pairs, config,
        work_dir, logger, settings.adapter_seal_key())
    chosen = None
    if selection:
        chosen = select_served_weight(settings, target_info, spec, base, tokenizer, assistants, config, selection,
                                      forget, retain, wordings)
        logger.info("served w %g chosen for this erasure (default %g)", chosen.weight, config.weight)
    trainable = sum(p.numel() for p in assistants[0].parameters() if p.requires_grad)
    vocab_size = base.get_output_embeddings().out_features
    trained = TrainedUnlearning(
        method=method, trains=ASSISTANT, config=asdict(config), report=asdict(reports[0]),
        forget_pairs=len(forget_pairs), retain_pairs=len(retain_pairs),
        adapter_dirs=tuple(adapter_dirs),
        weights=tuple(ensemble_weights(chosen.weight if chosen else config.weight, len(adapter_dirs))),
        trainable_parameters=trainable,
        ensemble_reports=tuple(asdict(r) for r in reports) if len(reports) > 1 else (),
        weight_selection=chosen.as_dict() if chosen else None,
        question_wordings=sum(map(len, wordings.values())) if paraphraser_sha256 else None,
        paraphraser_weights_sha256=paraphraser_sha256,
        convergence=tuple(convergence(report, config, vocab_size, len(forget_pairs)) for report in reports),
        prompt_template=prompt_format(target_info).template,
        auto_settings=derived or None,
        inputs_fingerprint=inputs_fingerprint,
    )
    write_json(work_dir / "training.json", trained.as_json())
    for warning in trained.warnings():
        logger.warning("%s", warning)
    logger.info("%d assistant(s) trained in %.1fs (%d steps, %d trainable parameters each)", len(reports),
                sum(r.seconds for r in reports), reports[0].steps, trainable)
    return trained


TRAINERS = {FULL_MODEL: edit_model_weights, ASSISTANT: train_assistants}


def unlearning_task(method: str):
    """The task that trains `method`, by what the method trains."""
    return TRAINERS[method_entry(method).trains]
