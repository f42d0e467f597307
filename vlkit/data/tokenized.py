"""Tokenized records kept on disk between runs, so the runs of a study template their data file once.

Templating every record through the chat template is most of a stage's data check (measured on the toy world's
20 000 instruct records: ~18 s of ~24 s, apply_chat_template's Jinja renders mostly), and every run of a grid
repeated it per stage. The results depend only on the data file's bytes, the tokenizer (vocabulary, merges,
special tokens, chat template), the image placeholder's id and expansion, ``max_length`` and vlkit's templating
code, so they are stored under a hash of exactly those. Image files are still checked on every run (they can
change without the data file changing); only the tokenization is reused. A missing or unreadable entry is simply
recomputed and rewritten (atomically): this cache only ever saves time.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from vlkit._atomic import write_text_atomic

FORMAT = 1


def default_dir() -> Path:
    """``$VLKIT_TOKENIZED_DIR``, else ``tokenized/`` beside the feature cache (``~/.cache/vlkit/tokenized``)."""
    if os.environ.get("VLKIT_TOKENIZED_DIR"):
        return Path(os.environ["VLKIT_TOKENIZED_DIR"])
    from vlkit.cache import default_cache_dir

    return default_cache_dir().parent / "tokenized"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A hash of everything in a fast tokenizer that changes token ids or the template; None when it cannot be
    taken (a slow tokenizer): then nothing is cached."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    state = json.loads(backend.to_str())  # vocabulary, merges, normaliser, pre-tokeniser, added tokens
    for per_call in ("truncation", "padding"):  # set by each tokenizer(...) call, not a property of the tokenizer
        state.pop(per_call, None)
    h.update(json.dumps(state, sort_keys=True).encode())
    h.update(json.dumps(getattr(tokenizer, "chat_template", None), sort_keys=True, default=str).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _code_hash() -> str:
    """vlkit's templating and tokenizing code: any change to it is a new key."""
    from vlkit.data import llava

    return hashlib.sha256(Path(llava.__file__).read_bytes()).hexdigest()


class TokenizedCache:
    """The tokenization of one data file under one tokenizer and settings: ``memo`` maps a record's index to
    ``{"ids", "labels"}`` or ``{"kind", "message"}`` (why it is unusable), as ``check_records`` fills it."""

    def __init__(self, directory: Path, data_path: Path, tokenizer, image_token_id: int, num_image_tokens: int,
                 max_length: int) -> None:
        fp = tokenizer_fingerprint(tokenizer)
        self.path: Path | None = None
        self.memo: dict[int, dict[str, Any]] = {}
        self._stored = 0
        if fp is None:
            return
        key = hashlib.sha256(json.dumps([FORMAT, _code_hash(), _sha256_file(Path(data_path)), fp, image_token_id,
                                         num_image_tokens, max_length]).encode()).hexdigest()[:24]
        self.path = Path(directory) / f"{key}.json"
        try:
            data = json.loads(self.path.read_text())
            self.memo = {int(k): v for k, v in data["records"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.memo = {}  # none yet, or unreadable: recomputed below and rewritten
        self._stored = len(self.memo)

    def save(self) -> str | None:
        """Write the memo when this run added records to it (temp file + rename: never half-written). Returns why
        it could not be written (the run goes on: the next one templates again), else None."""
        if self.path is None or len(self.memo) == self._stored:
            return None
        try:
            write_text_atomic(self.path, json.dumps({"format": FORMAT, "records": self.memo}, separators=(",", ":")))
        except OSError as exc:
            return f"tokenized records not kept in {self.path.parent}: {exc} (set VLKIT_TOKENIZED_DIR to move them)"
        self._stored = len(self.memo)
        return None
