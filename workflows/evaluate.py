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

Loading (`load`, see `plan_load`): the model in `dtype` when it fits the memory at hand (GPUs with
device_map "auto", else half of the free RAM), else NF4 4-bit exactly as training loads its base
(continual.model.load_base_4bit), else an error; never a whole full-precision model that does not fit.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import GraftError, input_error
from common.io import atomic_path, atomic_write_json, write_manifest
from common.rerun import guard, listed, overwrite_field

LOADS = ("auto", "full", "nf4")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_BOS = True  # corpus prepare's default; used when no corpus folder says otherwise
CPU_SHARE = 0.5     # a model loaded on CPU may take at most this share of the available RAM
GPU_SHARE = 0.9     # ... on GPUs, this share of their free memory (the rest: activations, CUDA context)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weights + 8-bit absmax per 64 + fp32 per 256 absmax


# ---------------------------------------------------------------- fitting a checkpoint to the machine

def checkpoint_params(folder: str | Path) -> dict[str, int]:
    """Parameters of a safetensors checkpoint read from its headers (no tensor data is read): `total`,
    and `quantized`, those NF4 loading puts in 4-bit (2-D Linear weights except routers, gates and lm_head)."""
    from common.checkpoint import open_checkpoint
    from continual.arch import skip_modules

    ckpt = open_checkpoint(folder)
    skip = skip_modules(ckpt.config)
    total = quantized = 0
    for h in ckpt.headers.values():
        for name, info in h.tensors.items():
            n = math.prod(info.shape)
            total += n
            parts = name.split(".")
            if (len(info.shape) == 2 and name.endswith(".weight") and "embed_tokens" not in parts
                    and not any(s in parts for s in skip)):
                quantized += n
    return {"total": total, "quantized": quantized}


def available_ram() -> int:
    """Bytes of RAM this process can still use: MemAvailable, capped by a cgroup (v2) memory limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, avail)


def free_gpu_memory() -> list[int]:
    """Free bytes per visible GPU (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


@dataclass
class LoadPlan:
    """How one checkpoint is loaded: `mode` full (`dtype` weights) or nf4, where, and the figures behind it."""

    folder: str
    mode: str                 # "full" | "nf4"
    dtype: str                # weights (full) or compute dtype (nf4)
    device: str               # "cuda" | "cpu"
    device_map: str | None
    params: int
    need: dict[str, int]      # estimated bytes per mode: {"full": ..., "nf4": ...}
    budget: int               # bytes the rule allows
    rule: str                 # the rule, in words, with the figures

    def describe(self) -> str:
        what = f"NF4 4-bit (compute {self.dtype})" if self.mode == "nf4" else self.dtype
        return f"{what} on {self.device}" + (f", device_map {self.device_map}" if self.device_map else "")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gb(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_load_settings(load: str, dtype: str, key: str = "load") -> None:
    if load not in LOADS:
        raise GraftError(f"{key} = {load!r}. Fix: use one of {', '.join(LOADS)}")
    if dtype not in DTYPES:
        raise GraftError(f"dtype = {dtype!r}. Fix: use one of {', '.join(DTYPES)}")


def plan_load(folder: str | Path, load: str = "auto", dtype: str = "auto", device_map: str = "",
              key: str = "load") -> LoadPlan:
    """Decide how to load `folder` so that it fits this machine (see the module docstring).

    `auto`: `full` when the model in `dtype` fits the budget (GPUs: 90% of their free memory, spread
    with device_map "auto"; no GPU: half of the available RAM), else `nf4` when that fits, else a
    GraftError naming the folder, the sizes and the fix. `full`/`nf4` force a mode (no size check).
    """
    check_load_settings(load, dtype, key)
    gpus = free_gpu_memory()
    device = "cuda" if gpus else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if gpus else "float32"
    n = checkpoint_params(folder)
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    need = {"full": n["total"] * width,
            "nf4": round(n["quantized"] * NF4_BYTES_PER_PARAM + (n["total"] - n["quantized"]) * width)}
    if gpus:
        budget = int(GPU_SHARE * sum(gpus))
        rule = (f"{GPU_SHARE:.0%} of the free memory of {len(gpus)} GPU(s), {_gb(budget)}, against "
                f"~{_gb(need['full'])} in {dtype} or ~{_gb(need['nf4'])} in NF4")
    else:
        ram = available_ram()
        budget = int(CPU_SHARE * ram)
        rule = (f"no GPU: at most {CPU_SHARE:.0%} of the available RAM ({_gb(ram)}), {_gb(budget)}, against "
                f"~{_gb(need['full'])} in {dtype} or ~{_gb(need['nf4'])} in NF4")
    if load == "auto":
        fits = [m for m in ("full", "nf4") if need[m] <= budget]
        if not fits:
            raise GraftError(f"{folder}: the model ({_count(n['total'])} parameters) does not fit this machine "
                             f"({rule}). Fix: run this stage where it fits (a GPU node), or force `{key} = \"nf4\"` "
                             f"or `{key} = \"full\"` in its config to try anyway")
        load = fits[0]
    dm = device_map or ("auto" if gpus else None)
    return LoadPlan(str(folder), load, dtype, device, dm, n["total"], need, budget, rule)


def load_model(plan: LoadPlan):
    """Load the checkpoint as `plan` says (NF4 through continual.model.load_base_4bit, as training does)."""
    import torch
    from transformers import AutoModelForCausalLM

    from continual import model as M

    dtype = M.torch_dtype(plan.dtype)
    if plan.mode == "nf4":
        return M.load_base_4bit(plan.folder, dtype, device_map=plan.device_map or None)
    kw = {"device_map": plan.device_map} if plan.device_map else {}
    model = AutoModelForCausalLM.from_pretrained(plan.folder, dtype=dtype, low_cpu_mem_usage=True, **kw)
    if not plan.device_map and plan.device == "cuda":
        model.to("cuda")
    return model


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
                                                     f"('' = BOS, prepare's default)"})
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

        check_load_settings(self.load, self.dtype)
        check_ranges(self, {"max_len": ">=1", "max_docs": ">=0", "batch_size": ">=1"})


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
