"""Shared fixtures: the real Mixtral base tokenizer and real Chinese/English text (loaded offline)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from demo import sources  # noqa: E402


@pytest.fixture(scope="session")
def base_model_path() -> Path:
    """Mixtral's real SentencePiece tokenizer.model (32,000 pieces)."""
    return sources.base_tokenizer_model()


@pytest.fixture(scope="session")
def tekken_path() -> Path:
    """Mistral-Nemo's real byte-level tokenizer (tekken JSON, 131,072 ids)."""
    return sources.tekken_tokenizer_file()


@pytest.fixture(scope="session")
def news_lines() -> tuple[str, ...]:
    return sources.people_daily_lines()


@pytest.fixture(scope="session")
def review_lines() -> tuple[str, ...]:
    return sources.review_lines()


@pytest.fixture(scope="session")
def english_paragraphs() -> tuple[str, ...]:
    return sources.english_paragraphs()


@pytest.fixture(scope="session")
def demo_corpora(tmp_path_factory) -> dict[str, Path]:
    """The demo corpora written as jsonl once per test session."""
    return sources.write_demo_corpora(tmp_path_factory.mktemp("corpora"))
