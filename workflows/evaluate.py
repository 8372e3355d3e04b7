"""`eval.bpb` stage: dev bits per byte of several checkpoints on the same held-out documents.

Per-token loss cannot compare models with different vocabularies (a longer token carries more
text), so every model is scored on the *same* documents in bits per UTF-8 byte of text:
    bpb = (sum over the document's predicted tokens of -ln p(token | previous)) / ln 2 / bytes(document)
Each document is laid out exactly as `graft corpus prepare` puts it in a training block: BOS, the
tokens of the model's own tokenizer, EOS (`corpus prepare --no-bos`: the document follows the EOS of
the previous one instead of a BOS). The setting comes from the corpus manifest (`corpus`, key `bos`);
every text token and the closing EOS are predicted exactly once, in windows of `max_len` inputs where
each window begins with the last token of the previous one. So a dev block that holds one whole
document gives the same bits per byte here as in the trainer's dev eval (tests/test_workflow_eval.py).

Loading (`load`, see continual/load.py): the model in `dtype` when it fits the memory at hand (GPUs with
device_map "auto", else half of the free RAM), else NF4 4-bit exactly as training loads its base
(continual.model.load_base_4bit), else an error; never a whole full-precision model that does not fit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import GraftError, input_error
from common.io import atomic_path, atomic_write_json, write_manifest
from common.rerun import guard, listed, overwrite_field

DEFAULT_BOS = True  # corpus prepare's default; used when no corpus folder says otherwise


def corpus_bos(corpus: str) -> bool:
    """The BOS setting documents are scored with: the `bos` of a corpus prepare/mix folder's manifest (or of a
    train folder's), else corpus prepare's default."""
    from common.io import MANIFEST, read_json

    if not corpus:
        return DEFAULT_BOS
    m = Path(corpus) / MANIFEST
    if not m.is_file():
        raise input_error(corpus, f"has no {MANIFEST}", "set `corpus` to a finished `corpus prepare`/`mix` (or train) "
                                                        "folder, the one the trained model's data came from")
    manifest = read_json(m)
    if manifest.get("stage") == "continual.train":
        if not isinstance(manifest.get("bos"), bool):
            raise input_error(m, "records no `bos` (trained on blocks without a corpus manifest)",
                              "set `corpus` to the `corpus prepare`/`mix` folder instead")
        return manifest["bos"]
    from corpus.blocks import manifest_bos

    return manifest_bos(corpus, manifest)


def bits_per_byte(model, tok, texts: list[str], *, bos: int, eos: int | None = None, max_len: int = 256,
                  batch_size: int = 8, on_positions=None) -> dict[str, float]:
    """Summed nats, predicted tokens, bytes, mean loss per token and bits per byte of `texts` under `model`,
    and the tokenizer's text tokens per byte (without BOS/EOS).

    Each document is `bos` + its tokens (+ `eos`, predicted too, when given): `bos` is the token every
    document is conditioned on (BOS; the EOS of the previous document for a corpus without BOS).
    `tok` is a `tokenizers.Tokenizer` (common.tokenizer_files.load_fast_tokenizer).
    `on_positions(logits, targets)`, when given, is called per batch with the fp32 logits (positions x vocab)
    and the target ids of the scored positions (e.g. to measure where the probability goes).
    """
    import torch
    import torch.nn.functional as F

    if max_len < 2:
        raise GraftError("max_len must be >= 2")
    windows: list[list[int]] = []
    n_bytes = n_tokens = n_text = 0
    tail = [] if eos is None else [eos]
    for enc, text in zip(tok.encode_batch(list(texts), add_special_tokens=False), texts):
        ids = [bos] + enc.ids + tail
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids) - 1
        n_text += len(enc.ids)
        start = 0
        while start < len(ids) - 1:
            windows.append(ids[start:start + max_len])
            start += max_len - 1
    windows.sort(key=len)
    nats = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(windows), batch_size):
            group = windows[lo:lo + batch_size]
            width = max(len(w) for w in group)
            x = torch.zeros((len(group), width), dtype=torch.long)
            y = torch.full((len(group), width), -100, dtype=torch.long)
            for i, w in enumerate(group):
                x[i, :len(w)] = torch.tensor(w)
                y[i, :len(w) - 1] = torch.tensor(w[1:])
            logits = model(input_ids=x.to(model.device), use_cache=False).logits.float()
            y = y.to(logits.device)
            nats += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                          ignore_index=-100, reduction="sum"))
            if on_positions is not None:
                on_positions(logits[y != -100], y[y != -100])
    model.train(was_training)
    return {"nats": nats, "tokens": n_tokens, "bytes": n_bytes, "loss": nats / max(1, n_tokens),
            "bpb": nats / math.log(2) / max(1, n_bytes), "tokens_per_byte": n_text / max(1, n_bytes)}


@dataclass
class EvalConfig:
    """Dev bits per byte of several checkpoints (each with its own tokenizer) on the same documents."""

    models: list[str] = field(metadata={"help": "HF checkpoint folders, each holding its tokenizer files"})
    labels: list[str] = field(metadata={"help": "a name per model, e.g. base, embed-init, trained"})
    dev: list[str] = field(metadata={"help": "held-out .jsonl files (field text)"})
    out: str = field(metadata={"help": "output folder: bpb.json + manifest.json"})
    corpus: str = field(default="", metadata={"help": "`corpus prepare`/`mix` (or train) folder of the training "
                                                     "data: its manifest's `bos` decides how documents start "
                                                     "('' = BOS, prepare's default)"})
    max_len: int = field(default=256, metadata={"help": "tokens per evaluation window"})
    max_docs: int = field(default=0, metadata={"help": "documents per dev file (0 = all)"})
    batch_size: int = field(default=8, metadata={"help": "windows per forward pass"})
    load: str = field(default="auto", metadata={"help": "auto | full | nf4: auto loads in `dtype` when the model "
                                                       "fits (GPUs, else half the free RAM), else NF4 4-bit as "
                                                       "training did, else stops with an error"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU) | float32 | "
                                                        "bfloat16 | float16; the compute dtype under nf4"})
    device_map: str = field(default="", metadata={"help": "transformers device_map ('' = auto on GPUs, none on "
                                                         "CPU)"})
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:  # bad values fail when the workflow is read, not after training
        from common.validate import check_ranges
        from continual.load import DTYPES, LOADS

        check_ranges(self, {"max_len": ">=1", "max_docs": ">=0", "batch_size": ">=1"},
                     choices={"load": LOADS, "dtype": DTYPES})


def evaluate_models(cfg: EvalConfig) -> Path:
    from common.tokenizer_files import load_fast_tokenizer
    from corpus.texts import read_jsonl_texts

    if len(cfg.models) != len(cfg.labels):
        raise GraftError(f"{len(cfg.models)} models but {len(cfg.labels)} labels. Fix: give one label per model")
    skip, rerun = guard(cfg, cfg.out, stage="eval.bpb", volatile=("device_map",),
                        inputs={"corpus": cfg.corpus or None, **listed("model", cfg.models), **listed("dev", cfg.dev)})
    if skip:
        return Path(cfg.out)
    for folder in cfg.models:
        if not (Path(folder) / "config.json").is_file():
            raise input_error(folder, "has no config.json (not a HF checkpoint)", "point models at checkpoint folders")
    from continual.load import load_model, plan_load

    started = time.time()
    bos_setting = corpus_bos(cfg.corpus)
    plans = [plan_load(folder, cfg.load, cfg.dtype, cfg.device_map) for folder in cfg.models]  # all checked first
    dev = {Path(p).name.split(".")[0]: read_jsonl_texts([p]) for p in cfg.dev}
    if cfg.max_docs:
        dev = {k: v[:cfg.max_docs] for k, v in dev.items()}
    print(f"  documents start with {'BOS' if bos_setting else 'the previous EOS (corpus without BOS)'} and end "
          "with EOS" + (f" (bos = {str(bos_setting).lower()} in {cfg.corpus})" if cfg.corpus else ""))
    results: dict[str, Any] = {}
    for label, folder, plan in zip(cfg.labels, cfg.models, plans):
        print(f"  {label}: loading {plan.describe()} ({plan.rule})")
        model = load_model(plan)
        tok = load_fast_tokenizer(folder)
        bos, eos = _special_ids(model.config, tok, folder)
        results[label] = {"model": str(folder), "vocab_size": int(model.config.vocab_size),
                          "load": {"mode": plan.mode, "dtype": plan.dtype, "device": plan.device,
                                   "device_map": plan.device_map, "rule": plan.rule}}
        for name, texts in dev.items():
            r = bits_per_byte(model, tok, texts, bos=bos if bos_setting else eos, eos=eos, max_len=cfg.max_len,
                              batch_size=cfg.batch_size)
            results[label][name] = r
            print(f"  {label:12s} {name:14s} bpb {r['bpb']:.4f}  loss/token {r['loss']:.4f}  "
                  f"tokens/byte {r['tokens_per_byte']:.4f}")
        del model
    out = Path(cfg.out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        atomic_write_json(tmp / "bpb.json", results)
        write_manifest(tmp, stage="eval.bpb", config=cfg, started=started,
                       inputs={"models": cfg.models, "dev": cfg.dev, "corpus": cfg.corpus},
                       counts={f"{lab}/{name}_bpb": round(results[lab][name]["bpb"], 4)
                               for lab in cfg.labels for name in dev},
                       results=results, bos=bos_setting, rerun=rerun)
    return out


def _special_ids(config, tok, folder) -> tuple[int, int]:
    """BOS and EOS ids: the model config's, else the tokenizer's <s> and </s>."""
    ids = []
    for attr, piece in (("bos_token_id", "<s>"), ("eos_token_id", "</s>")):
        i = getattr(config, attr, None)
        i = i[0] if isinstance(i, list) else i
        i = tok.token_to_id(piece) if i is None else i
        if i is None:
            raise input_error(Path(folder) / "config.json", f"has no {attr} and the tokenizer no {piece}",
                              f"set {attr} in config.json")
        ids.append(int(i))
    return ids[0], ids[1]
