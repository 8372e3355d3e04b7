"""Whole documents of .jsonl files as a list of texts (the demo base model's training text, the eval stage's dev
sets), read with corpus.readers: rejected records are summarised, no text at all is an error."""
from __future__ import annotations

from common.errors import input_error


def read_jsonl_texts(paths: list[str]) -> list[str]:
    """Every text of `paths`, in order."""
    from corpus.readers import RejectLog, iter_texts

    rejects = RejectLog()
    texts = [r.text for r in iter_texts(paths, rejects=rejects)]
    if rejects.total:
        print(f"  {rejects.summary()}")
    if not texts:
        raise input_error(", ".join(paths), "no text", "pass non-empty .jsonl files with a 'text' field")
    return texts
