"""Whole documents as a list of texts: .jsonl files (the demo base model's training text, the eval stage's dev
sets), read with corpus.readers: rejected records are summarised, no text at all is an error; and English prose
that every Python installation holds (`graft embed check` compares logits on it)."""
from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=1)
def pydoc_topic_texts() -> tuple[str, ...]:
    """79 English documents: the Python reference's help topics, in sorted topic order."""
    from pydoc_data.topics import topics

    return tuple(topics[k] for k in sorted(topics))


def english_paragraphs() -> tuple[str, ...]:
    """The pydoc topics split at blank lines: ~5k English paragraphs (with code)."""
    return tuple(p.strip("\n") for doc in pydoc_topic_texts() for p in doc.split("\n\n") if p.strip())
