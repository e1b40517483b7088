"""Assistants sealed at rest. An assistant is trained to *remember* the forget set, so its adapter decoded alone
states the subject's data; the copy a model version carries is therefore encrypted (AES-256-GCM) under a key
derived from the deployment secret, and opened in memory by the serving path only.

A sealed adapter directory holds one file, `SEALED_FILE`: a header, a 12-byte nonce and the ciphertext of a ZIP
archive of the adapter's files. The header is authenticated too, so a file cannot be passed off as another format.
"""
from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

SEALED_FILE = "assistant.sealed"
HEADER = b"expunge sealed assistant v1\n"
NONCE_BYTES = 12


# The purpose the assistants' sealing key is derived for (`derived_key`).
ASSISTANT_SEAL = "assistant seal"


def derived_key(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose (sealing assistants, sealing audit events), derived from the deployment
    secret, so no two uses share a key. Here because the registered pyfunc, which carries only `expunge_ml` and
    `models_registry`, derives the assistants' key too."""
    import hashlib
    import hmac

    return hmac.new(secret, f"expunge {purpose} v1".encode(), hashlib.sha256).digest()


class SealedAdapterError(RuntimeError):
    """A sealed assistant that cannot be opened: no key, or not this deployment's key, or a damaged file."""


def is_sealed(adapter_dir: str | Path) -> bool:
    return (Path(adapter_dir) / SEALED_FILE).is_file()


def _cipher(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(key) != 32:
        raise ValueError("a sealing key is 32 bytes (AES-256)")
    return AESGCM(key)


def seal_directory(adapter_dir: str | Path, out_dir: str | Path, key: bytes) -> Path:
    """Write the files of `adapter_dir` (flat: a PEFT adapter and its ULD settings) sealed into `out_dir`."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as bundle:
        for path in sorted(Path(adapter_dir).iterdir()):
            if path.is_file():
                bundle.writestr(path.name, path.read_bytes())
    nonce = os.urandom(NONCE_BYTES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sealed = out / SEALED_FILE
    sealed.write_bytes(HEADER + nonce + _cipher(key).encrypt(nonce, archive.getvalue(), HEADER))
    return sealed


def open_sealed(adapter_dir: str | Path, key: bytes | None) -> dict[str, bytes]:
    """The adapter's files, name → bytes, decrypted in memory (never written out in clear)."""
    from cryptography.exceptions import InvalidTag

    path = Path(adapter_dir) / SEALED_FILE
    if not key:
        raise SealedAdapterError(f"{path} is sealed: serve it where the deployment key is set "
                                 "(EXPUNGE_HMAC_KEY, or the home's secret.key)")
    data = path.read_bytes()
    if not data.startswith(HEADER) or len(data) < len(HEADER) + NONCE_BYTES:
        raise SealedAdapterError(f"{path} is not a sealed assistant")
    nonce = data[len(HEADER):len(HEADER) + NONCE_BYTES]
    try:
        plain = _cipher(key).decrypt(nonce, data[len(HEADER) + NONCE_BYTES:], HEADER)
    except InvalidTag:
        raise SealedAdapterError(f"{path} does not open with this deployment's key (another deployment's, "
                                 "or a damaged file)") from None
    with zipfile.ZipFile(io.BytesIO(plain)) as bundle:
        return {name: bundle.read(name) for name in bundle.namelist()}
