"""Subject data stays inside the home and readable by its user only: no `datasets` cache of the corpus, the audit
DB, the key. Run in a fresh process, as the CLI is: these are process-wide settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


def test_the_corpus_cache_and_every_file_stay_in_the_home_and_private(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"question": f"Who is person {i}?", "answer": f"Person {i} is Ana Lind."})
                              + "\n" for i in range(5)))
    home, user_cache = tmp_path / "home", tmp_path / "user-cache"
    script = textwrap.dedent(f"""
        import os, stat, threading
        from expunge.settings import Settings
        settings = Settings(home=__import__("pathlib").Path({str(home)!r}), profile_name="tiny")
        settings.apply_environment()
        keys = []
        threads = [threading.Thread(target=lambda: keys.append(settings.hmac_key())) for _ in range(4)]
        [t.start() for t in threads]; [t.join() for t in threads]
        assert len(set(keys)) == 1, "two first uses made two keys"
        from expunge_ml.corpus import CorpusSpec, load_corpus
        assert len(load_corpus(CorpusSpec(source={str(corpus)!r}))) == 5
        from db import session_scope
        with session_scope(settings.db_url):
            pass
        for path in [settings.home, settings.home / "secret.key", settings.home / "audit.db"]:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert mode & 0o077 == 0, (path, oct(mode))
    """)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(user_cache), "CI": "true"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cached = [p for p in home.rglob("*") if p.is_file() and "cache" in p.parts]
    assert cached == []  # the corpus is read into memory: no lasting copy of its records, even under the home
    outside = [p for root in (user_cache, tmp_path / ".cache") for p in root.rglob("*") if p.is_file()]
    assert outside == []  # nothing in the user's cache directories


def _files_holding(roots: list[Path], terms: list[str]) -> list[str]:
    """Every file under `roots` whose bytes hold one of `terms` (UTF-8, any case): databases, logs, artifacts."""
    needles = [term.casefold().encode() for term in terms]
    found = []
    for root in roots:
        for path in (p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes().decode("utf-8", "replace").casefold().encode()
            found += [f"{path.relative_to(root.parent)}" for needle in needles if needle in data][:1]
    return found


def test_after_a_decision_no_clear_subject_text_is_left_and_the_assistant_cannot_be_read_back(tiny_home, tmp_path):
    """A ticket run and approved in a fresh deployment home, with the CLI in processes whose user home and cache
    are ours to inspect: no file there names the subject or holds its records' text, the registry's included.
    The corpus and the base taught on it (outside this home) are the user's own data, out of scope."""
    import yaml

    from expunge_ml.methods.uld import load_assistant
    from expunge_ml.sealed import SEALED_FILE, SealedAdapterError
    from expunge_ml.serving import load_base

    world, base_dir = tiny_home / "sample_world", tiny_home / "models" / "sample-base"
    sample = yaml.safe_load((world / "sample_request.yaml").read_text())
    request = {**{k: sample[k] for k in ("type", "regulation", "subject")}, "ticket_id": "SCAN-0001",
               "target_model": str(base_dir),
               "corpus": {"source": str(world / "corpus.jsonl"), "holdout": str(world / "holdout.jsonl")}}
    (tmp_path / "request.yaml").write_text(yaml.safe_dump(request))
    home, user = tmp_path / "home", tmp_path / "user"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "HF_", "XDG_"))}
    env.update(HOME=str(user), XDG_CACHE_HOME=str(user / ".cache"), EXPUNGE_HOME=str(home), EXPUNGE_PROFILE="tiny",
               EXPUNGE_THREADS="1", CI="true")
    for args in (["submit", str(tmp_path / "request.yaml")], ["run", "SCAN-0001"],
                 ["approve", "SCAN-0001", "--reviewer", "dpo@example.org"]):
        done = subprocess.run([sys.executable, "-m", "expunge.cli", *args], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    (tmp_path / "request.yaml").unlink()  # the filer's copy, not the product's

    subject = sample["subject"]
    records = [json.loads(line) for line in (world / "corpus.jsonl").read_text().splitlines()]
    answers = [r["answer"] for r in records if r.get("subject") == subject["names"][0]]
    assert answers, "the subject's records were found"
    terms = [*subject["names"], *subject.get("aliases", []), *subject["identifiers"], *answers]
    assert _files_holding([world], terms)  # the scan does find them where they are: the user's own corpus
    assert _files_holding([home, user], terms) == []

    sealed = [p.parent for p in (home / "mlartifacts").rglob(SEALED_FILE)]
    assert sealed and not list(home.rglob("adapter_model.safetensors"))  # no assistant in clear, work dirs included
    base, _ = load_base(base_dir)
    with pytest.raises(SealedAdapterError, match="is sealed"):
        load_assistant(base, sealed[0])  # what a reader of the registry without the deployment key gets
