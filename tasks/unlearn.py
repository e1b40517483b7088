"""Train the unlearning artefact (the ULD assistant) for a resolved request."""
from __future__ import annotations

from dataclasses import asdict

from prefect import get_run_logger, task

from expunge_ml.evidence import ServedModel
from expunge_ml.methods.uld import (ULDConfig, build_assistant, ensemble_members, ensemble_weights, load_assistant,
                                   save_assistant, train_assistant, training_pairs)
from expunge_ml.methods.registry import uld_config_for
from expunge_ml.modeling import load_causal_lm, weights_fingerprint
from expunge_ml.prompting import DEFAULT_PROMPT_TEMPLATE, PromptFormat
from tasks.context import read_json, request_spec, settings_for, write_json
from tasks.data import records_for_manifest


def load_base(target_info: dict, device: str = "cpu", dtype: str = "float32"):
    """The base model of the target, checked against the weight hash the registry pinned, on `device`."""
    from pathlib import Path

    location = target_info["base_location"]
    expected = target_info.get("base_weights_sha256")
    if expected and Path(location).is_dir():
        actual = weights_fingerprint(Path(location))
        if actual != expected:
            raise RuntimeError(f"base weights {actual[:12]}… differ from the pinned {expected[:12]}…")
    return load_causal_lm(location, dtype=dtype, device=device)


def served_model(base, adapters: list[dict]) -> ServedModel:
    """The base alone, or base + Σ w·assistant over every erasure so far (weight None = the adapter's own)."""
    loaded = [load_assistant(base, adapter["dir"]) for adapter in adapters]
    weights = [
        float(adapter["weight"]) if adapter.get("weight") is not None else config.weight
        for adapter, (_, config) in zip(adapters, loaded)
    ]
    relative_top = loaded[-1][1].relative_top if loaded else 0.0
    # each assistant is subtracted the way its own erasure was evaluated and approved
    return ServedModel(base, [model for model, _ in loaded], weights, relative_top,
                       [config.subtraction for _, config in loaded])


def prompt_format(target_info: dict) -> PromptFormat:
    return PromptFormat(template=target_info.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE)


def anchors_for(spec) -> dict[str, str]:
    """WHP's anchored terms → generic stand-ins: the subject's own names and identifiers."""
    generic = {term: "the person" for term in [*spec.subject.names, *spec.subject.aliases]}
    generic.update({term: "their details" for term in spec.subject.identifiers})
    return generic


@task(name="unlearn-full-model")
def unlearn_baseline(home: str, profile: str, ticket_id: str, resolved: dict, method: str) -> dict:
    """A baseline (GA, NPO, …) edits a copy of the base itself; the result is a full model version."""
    from expunge_ml.methods.registry import baseline_config_for, get_method

    settings = settings_for(home, profile)
    logger = get_run_logger()
    target_info = read_json(resolved["target_path"])
    if target_info.get("prior_assistants"):
        from expunge.requests import RequestError

        raise RequestError("method_needs_plain_model",
                           f"{method} edits model weights; the target is a ULD composite — use method uld")
    spec = request_spec(settings, ticket_id)
    forget = records_for_manifest(settings, target_info, resolved["forget_manifest"])
    retain = records_for_manifest(settings, target_info, resolved["retain_manifest"])
    config = baseline_config_for(settings.profile["unlearning"], method)
    model, tokenizer = load_base(target_info, settings.device, settings.dtype)
    extra = {"anchors": anchors_for(spec)} if method == "whp" else {}
    report = get_method(method).unlearn(
        model, tokenizer, prompt_format(target_info), forget, retain, config,
        progress=lambda epoch, losses: logger.info("epoch %d: %s", epoch, losses), **extra,
    )
    model_dir = settings.ticket_dir(ticket_id) / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = {
        "method": method,
        "model_dir": str(model_dir),
        "weights_sha256": weights_fingerprint(model_dir),
        "config": asdict(config),
        "report": asdict(report),
        "forget_pairs": len(forget),
        "retain_pairs": len(retain),
    }
    write_json(settings.ticket_dir(ticket_id) / "training.json", result)
    logger.info("%s finished in %.1fs (%d steps)", method, report.seconds, report.steps)
    return result


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
    from pathlib import Path

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


def new_assistants(trained: dict) -> list[dict]:
    """This erasure's assistants as served: each adapter directory with its share of w."""
    return [{"dir": d, "weight": w} for d, w in zip(trained["adapter_dirs"], trained["weights"], strict=True)]


def select_served_weight(settings, target_info: dict, spec, base, tokenizer, assistants: list, config: ULDConfig,
                         selection: dict, forget, retain, wordings: dict, holdout=()):
    """w for this erasure's assistants (`expunge_ml.weight_selection`), scored on the served composite:
    the earlier erasures' assistants at their own w plus this erasure's at each candidate's shares.

    Identifier rules: the erased side is the forget records' training questions, the retained side per
    `selection["retained"]`. `unseen_level`: the forget records' continuations against the model served
    before on `holdout` (the corpus's held-out records), generated with the evaluation's own budget."""
    import dataclasses

    from expunge_ml.evidence import EvidenceOptions, evidence_budget, probes_for
    from expunge_ml.weight_selection import select_weight, select_weight_unseen_level, training_question_probes
    from tasks.data import held_out_retain, selection_retain

    prior = served_model(base, list(target_info.get("prior_assistants", [])))
    evaluation = settings.profile["evaluation"]
    fmt = prompt_format(target_info)

    def composite_at(weight: float):
        return ServedModel(base, [*prior.assistants, *assistants],
                           [*prior.weights, *ensemble_weights(weight, len(assistants))], config.relative_top,
                           [*prior.subtraction_modes(), *[config.subtraction] * len(assistants)]).source()

    forget_ids, retain_ids = {r.record_id for r in forget}, {r.record_id for r in retain}
    if selection["rule"] == "unseen_level":
        options = EvidenceOptions.from_profile(evaluation)
        evaluated = held_out_retain(target_info, forget_ids, retain_ids, int(evaluation["retain_eval_max"]))
        budget = evidence_budget(tokenizer, fmt, forget, evaluated, options)
        return select_weight_unseen_level(prior.source(), composite_at, tokenizer, fmt, forget, holdout,
                                          selection["candidates"], config.weight, selection["margin"],
                                          max_new_tokens=budget, batch_size=options.batch_size)
    erased = training_question_probes(forget, wordings, spec.subject.identifiers)
    if selection["retained"] == "held_out":
        limit = int(evaluation["retain_eval_max"])
        validation = selection_retain(target_info, forget_ids, retain_ids, limit, limit)
        retained = probes_for(validation)  # every probe kind: these records are in no evaluation
    else:
        retained = training_question_probes(retain, wordings)
    chosen = select_weight(
        prior.source(), composite_at, tokenizer, fmt, erased, retained,
        selection["candidates"], config.weight, selection["rule"], selection["min_retained"],
        max_new_tokens=int(evaluation["max_new_tokens"]), batch_size=int(evaluation["batch_size"]))
    return dataclasses.replace(chosen, retained_probes=selection["retained"])


@task(name="train-uld-assistant")
def train_uld_assistant(home: str, profile: str, ticket_id: str, resolved: dict) -> dict:
    settings = settings_for(home, profile)
    logger = get_run_logger()
    target_info = read_json(resolved["target_path"])
    spec = request_spec(settings, ticket_id)
    forget = records_for_manifest(settings, target_info, resolved["forget_manifest"])
    retain = records_for_manifest(settings, target_info, resolved["retain_manifest"])
    config = uld_config_for(settings.profile["unlearning"], spec.type)
    selection = weight_selection_for(settings.profile["unlearning"], spec.type, config)
    holdout = []
    if selection and selection["rule"] == "unseen_level":
        from tasks.data import holdout_records

        # read once, and before training: a request without a holdout fails now, not after it
        holdout = holdout_records(target_info, forget, int(settings.profile["evaluation"].get("holdout_max", 64)))
        if not holdout:
            raise ValueError("unlearning.weight_selection rule unseen_level needs held-out records: give the "
                             "request's corpus a `holdout` (records of the same kind the model never trained on)")
    base, tokenizer = load_base(target_info, settings.device, settings.dtype)
    wordings, paraphraser_sha256 = ({}, None)
    if config.question_paraphrases:
        wordings, paraphraser_sha256 = question_wordings(settings.profile["unlearning"], config, forget, retain,
                                                         settings.device)
        logger.info("%d question wordings written for %d questions", sum(map(len, wordings.values())), len(wordings))
    forget_pairs, retain_pairs = training_pairs(forget, retain, config, fact_terms=subject_terms(spec),
                                                question_wordings=wordings)
    adapter_dirs, reports, assistants = [], [], []
    for index, member in enumerate(ensemble_members(config)):  # `uld.assistants`: 1 unless an ensemble
        assistant = build_assistant(base, member)
        reports.append(train_assistant(
            assistant, tokenizer, prompt_format(target_info), forget_pairs, retain_pairs, member,
            progress=lambda epoch, nll, kl, index=index: logger.info(
                "assistant %d, epoch %d: forget NLL %.4f, retain KL %.4f", index + 1, epoch, nll, kl)
            if epoch % 10 == 0 else None,
        ))
        out_dir = settings.ticket_dir(ticket_id) / ("assistant" if index == 0 else f"assistant_{index + 1}")
        adapter_dirs.append(str(save_assistant(assistant, member, out_dir)))
        assistants.append(assistant)
    weight = config.weight
    chosen = None
    if selection:
        chosen = select_served_weight(settings, target_info, spec, base, tokenizer, assistants, config, selection,
                                      forget, retain, wordings, holdout)
        weight = chosen.weight
        logger.info("served w %g chosen by the %s rule (default %g)", weight, chosen.rule, config.weight)
    report = reports[0]
    trainable = sum(p.numel() for p in assistant.parameters() if p.requires_grad)
    result = {
        "method": "uld",
        # every assistant of this erasure, each served at its share of w
        "adapter_dirs": adapter_dirs,
        "weights": ensemble_weights(weight, len(adapter_dirs)),
        "config": asdict(config),
        "report": asdict(report),
        "trainable_parameters": trainable,
        "forget_pairs": len(forget_pairs),
        "retain_pairs": len(retain_pairs),
    }
    if len(reports) > 1:
        result["ensemble_reports"] = [asdict(r) for r in reports]
    if chosen:  # the served w and what it was chosen from: counts and ratios only
        result["weight_selection"] = chosen.as_dict()
    if paraphraser_sha256:  # which LM wrote the wordings (counts and hashes only)
        result["question_wordings"] = sum(map(len, wordings.values()))
        result["paraphraser_weights_sha256"] = paraphraser_sha256
    write_json(settings.ticket_dir(ticket_id) / "training.json", result)
    logger.info("%d assistant(s) trained in %.1fs (%d steps, %d trainable parameters each)", len(reports),
                sum(r.seconds for r in reports), report.steps, trainable)
    return result
