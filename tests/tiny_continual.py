"""Small real inputs for the tests of continual/ and the benchmarks (no downloads; benchmarks put tests/ on sys.path).

- a tokenizer folder: Mixtral's real tokenizer (+ optionally the most frequent Chinese bigrams of the
  People's Daily text as added tokens, standing in for a grown vocabulary);
- a tiny Mixtral whose embeddings match it (demo.tiny);
- train/dev blocks: real Chinese + English text tokenized with that tokenizer, packed into
  fixed-length blocks, saved as `datasets` folders `<dir>/train` and `<dir>/dev`.
"""
from __future__ import annotations

import collections
import re
from pathlib import Path


def make_tokenizer(out: str | Path, n_added: int = 0) -> Path:
    from transformers import LlamaTokenizerFast

    from demo import sources

    tok = LlamaTokenizerFast(vocab_file=str(sources.base_tokenizer_model()), legacy=False)
    if n_added:
        counts = collections.Counter()
        for line in sources.people_daily_lines()[:3000]:
            for run in re.findall(r"[\u4e00-\u9fff]+", line):
                counts.update(run[i:i + 2] for i in range(len(run) - 1))
        added = [w for w, _ in counts.most_common(n_added)]
        assert tok.add_tokens(added) == n_added
    tok.save_pretrained(str(out))
    return Path(out)


def pack_blocks(texts, tokenizer, block_len: int, n_blocks: int) -> list[list[int]]:
    """Concatenate `<s> text </s>` documents and cut fixed-length blocks (the tail is dropped)."""
    buf: list[int] = []
    blocks = []
    for t in texts:
        buf += [tokenizer.bos_token_id] + tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id]
        while len(buf) >= block_len and len(blocks) < n_blocks:
            blocks.append(buf[:block_len])
            buf = buf[block_len:]
        if len(blocks) >= n_blocks:
            break
    return blocks


def make_blocks(out: str | Path, tokenizer_dir: str | Path, block_len: int = 32, n_train: int = 64,
                n_dev: int = 8, dev_block_len: int | None = None) -> Path:
    """`out/train` and `out/dev` datasets of real text (news + English; dev from held-out lines)."""
    import datasets
    from transformers import AutoTokenizer

    from demo import sources

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    news, en = sources.people_daily_lines(), sources.english_paragraphs()
    train_texts = [t for pair in zip(news[1:4000:2], en[1:4000:2]) for t in pair]
    dev_texts = [t for pair in zip(news[0:4000:2], en[0:4000:2]) for t in pair]
    feats = lambda n: datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"), length=n)})
    train = pack_blocks(train_texts, tok, block_len, n_train)
    dev_len = dev_block_len or block_len
    dev = pack_blocks(dev_texts, tok, dev_len, n_dev)
    out = Path(out)
    datasets.Dataset.from_dict({"input_ids": train}, features=feats(block_len)).save_to_disk(str(out / "train"))
    datasets.Dataset.from_dict({"input_ids": dev}, features=feats(dev_len)).save_to_disk(str(out / "dev"))
    return out


def make_tiny_base(out: str | Path, tokenizer_dir: str | Path, old_vocab_size: int | None = None, **kw) -> Path:
    """A tiny Mixtral sized to the tokenizer, with the tokenizer files copied in (as `graft embed init` leaves it)."""
    import json

    from transformers import AutoTokenizer

    from demo.tiny import save_tiny_mixtral

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    save_tiny_mixtral(out, vocab_size=len(tok), **kw)
    tok.save_pretrained(str(out))
    if old_vocab_size is not None:
        (Path(out) / "manifest.json").write_text(json.dumps({"stage": "embed_init", "status": "done",
                                                             "counts": {"old_vocab_size": old_vocab_size}}))
    return Path(out)


def tiny_workspace(root: str | Path, n_added: int = 64, block_len: int = 32) -> dict[str, Path]:
    """tokenizer (+`n_added` tokens), tiny base sized to it (manifest records old_vocab), train/dev blocks.

    Built once per `root` (later calls reuse it), so several test files share one workspace.
    """
    root = Path(root)
    paths = {"tok": root / "tok", "base": root / "base", "data": root / "data"}
    if not (root / "ready").is_file():
        root.mkdir(parents=True, exist_ok=True)
        make_tokenizer(paths["tok"], n_added=n_added)
        make_tiny_base(paths["base"], paths["tok"], old_vocab_size=32000)
        make_blocks(paths["data"], paths["tok"], block_len=block_len, n_train=64, n_dev=8)
        (root / "ready").write_text("ok")
    return paths


def tiny_train_config(ws: dict[str, Path], out: str | Path, **kw):
    """A TrainConfig that runs in seconds on 2 CPU cores (r 8, 2-block micro-batches, no progress bar)."""
    from continual.config import TrainConfig

    base = dict(model=str(ws["base"]), train_data=str(ws["data"]), out=str(out), lora_r=8, lora_alpha=16,
                learning_rate=5e-3, embedding_lr=5e-3, micro_batch_size=2, max_steps=8, eval_every=4,
                save_every=4, warmup_ratio=0.1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def train_killed_at(cfg, micro_batch: int) -> None:
    """Run `graft train` with `cfg` and kill it (as a crash would) when it asks for micro-batch `micro_batch`
    (0-based, counted from where this run starts); the checkpoints it wrote stay in cfg.out."""
    from continual import data as D
    from continual.train import train

    real = D.micro_batches

    def dies(*a, **kw):
        for k, item in enumerate(real(*a, **kw)):
            if k == micro_batch:
                raise RuntimeError("killed")
            yield item

    D.micro_batches = dies
    try:
        train(cfg)
    except RuntimeError as e:
        if str(e) != "killed":
            raise
    else:
        raise AssertionError(f"the run ended before micro-batch {micro_batch}")
    finally:
        D.micro_batches = real
