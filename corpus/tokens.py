"""Open the tokenizer used for packing, find its EOS/BOS ids and fingerprint it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import input_error
from common.tokenizer_files import load_fast_tokenizer


@dataclass
class PackTokenizer:
    tokenizer: Any  # tokenizers.Tokenizer
    eos_id: int
    bos_id: int
    eos_token: str
    bos_token: str
    sha256: str  # of the tokenizer's canonical JSON: equal hashes = identical tokenization
    vocab_size: int


def _config_token(folder: Path, key: str) -> str | None:
    cfg = folder / "tokenizer_config.json"
    if not cfg.is_file():
        return None
    try:
        value = json.loads(cfg.read_text(encoding="utf-8")).get(key)
    except (json.JSONDecodeError, OSError):
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_pack_tokenizer(path: str | Path, eos_token: str | None = None, bos_token: str | None = None) -> PackTokenizer:
    """Load a HF tokenizer folder / tokenizer.json / SentencePiece .model (common.tokenizer_files).

    EOS/BOS come from the arguments, else the folder's tokenizer_config.json, else `</s>` / `<s>`.
    """
    path = Path(path)
    tok = load_fast_tokenizer(path)
    folder = path if path.is_dir() else path.parent
    eos = eos_token or _config_token(folder, "eos_token") or "</s>"
    bos = bos_token or _config_token(folder, "bos_token") or "<s>"
    ids = {}
    for what, token in (("EOS", eos), ("BOS", bos)):
        tid = tok.token_to_id(token)
        if tid is None:
            raise input_error(path, f"the {what} token {token!r} is not in this tokenizer's vocabulary",
                              f"pass --{what.lower()}-token with the tokenizer's {what} token")
        ids[what] = tid
    sha = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()
    return PackTokenizer(tok, ids["EOS"], ids["BOS"], eos, bos, sha, tok.get_vocab_size(with_added_tokens=True))
