"""Subject data stays inside the home and readable by its user only: the `datasets` cache of the corpus, the
audit DB, the key. Run in a fresh process, as the CLI is: these are process-wide settings."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap


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
    assert cached, "the corpus was loaded through a cache under the home"
    outside = [p for root in (user_cache, tmp_path / ".cache") for p in root.rglob("*") if p.is_file()]
    assert outside == []  # nothing in the user's cache directories
