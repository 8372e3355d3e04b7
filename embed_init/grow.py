"""`graft embed init`: grow embed_tokens and lm_head of a safetensors checkpoint without loading the model.

Only the two embedding matrices are read. Every shard without them is hard-linked (or copied); the grown
matrices go to a new shard of their own (`model-grown-embeddings.safetensors`), and the shards that held the
old ones are rewritten without them (their other tensors copied as raw bytes). Peak memory is about one grown
matrix, one matrix at a time, whatever the model size (see common/checkpoint.py). A single-file checkpoint
stays a single `model.safetensors`: transformers prefers that file over an index, so it cannot be split.
"""
from __future__ import annotations

import math
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from common.checkpoint import (CONFIG_FILE, Checkpoint, TensorPlan, copy_side_files, open_checkpoint,
                               rewrite_checkpoint, torch_dtype)
from common.errors import input_error
from common.rerun import guard, listed
from common.tokenizer_files import CHAT_TEMPLATE_FILE, TOKENIZER_FILES
from common.io import (MANIFEST, atomic_path, atomic_write_json, file_sha256, is_complete, read_manifest,
                       remove_stale_temps, write_manifest)
from embed_init.config import DEFAULT_OUTPUT_METHOD, OUTPUT_ONLY_METHODS, EmbedInitConfig
from embed_init.tokens import SPECIAL, TokenizerPieces, check_extends, load_pieces, surface_encoder

# Tensor names of the input and output embedding matrices (continual.model.EMBED_NAMES are module names).
EMBED_TENSORS = ("model.embed_tokens.weight",)
LM_HEAD_TENSORS = ("lm_head.weight",)
HF_MEAN_EPSILON = 1e-9   # transformers' mean_resizing scales the covariance by this
NEW_SHARD = "model-grown-embeddings.safetensors"
_CHUNK_ROWS = 4096
_MEAN_CHUNK = 1024  # new ids per vectorised step of `mean`


def padded_rows(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple` (0 or 1 = no padding)."""
    return n if multiple <= 1 else -(-n // multiple) * multiple


def find_matrices(ckpt: Checkpoint) -> tuple[str, str | None, bool]:
    """(embed tensor name, lm_head name or None when tied and not stored, tied)."""
    embed = next((n for n in EMBED_TENSORS if ckpt.has(n)), None)
    if embed is None:
        embed = next((n for n in ckpt.weight_map if n.endswith("embed_tokens.weight")), None)
    if embed is None:
        raise input_error(ckpt.dir, "no embed_tokens tensor found in the checkpoint",
                          "pass a Llama/Mistral/Mixtral-style checkpoint (tensor model.embed_tokens.weight)")
    lm_head = next((n for n in LM_HEAD_TENSORS if ckpt.has(n)), None)
    # PretrainedConfig defaults tie_word_embeddings to True when config.json omits it.
    tied = bool(ckpt.config.get("tie_word_embeddings", True))
    if lm_head is None and not tied:
        raise input_error(ckpt.dir / CONFIG_FILE, "tie_word_embeddings is false but the checkpoint has no "
                          "lm_head.weight", "re-save the checkpoint with save_pretrained, or set "
                          "tie_word_embeddings to true if the output layer is tied")
    return embed, lm_head, tied


def new_shard_name(ckpt: Checkpoint) -> str:
    """File name of the shard that gets the grown matrices (one the source does not use)."""
    name, k = NEW_SHARD, 1
    while name in ckpt.headers:
        k += 1
        name = NEW_SHARD.replace(".safetensors", f"-{k}.safetensors")
    return name


def surface_sources(old: TokenizerPieces, new: TokenizerPieces) -> list[list[int]]:
    """For each new id (len(old)..len(new)-1): the old ids its surface text encodes to ([] = special/none)."""
    enc = surface_encoder(old)
    return [enc.encode(new.surface(i)) for i in range(len(old), len(new))]


def _mean_rows(old, chunk: int = _CHUNK_ROWS):
    """Mean of all rows in fp32, summed chunk by chunk (no fp32 copy of the whole matrix)."""
    import torch

    total = torch.zeros(old.shape[1], dtype=torch.float64)
    for s in range(0, old.shape[0], chunk):
        total += old[s:s + chunk].to(torch.float64).sum(0)
    return (total / old.shape[0]).to(torch.float32)


def _covariance(old, mean, chunk: int = _CHUNK_ROWS):
    """Population covariance of the rows (as transformers computes it), in fp32, chunked."""
    import torch

    cov = torch.zeros(old.shape[1], old.shape[1], dtype=torch.float32)
    for s in range(0, old.shape[0], chunk):
        x = old[s:s + chunk].to(torch.float32) - mean
        cov += x.T @ x
    return cov / old.shape[0]


PAD_SCALE = 8.0  # output padding rows = PAD_SCALE * mean of the old rows (see fill_new_rows)


def prefix_share_weights(sources: list[list[int]], n_old: int) -> list[float | None]:
    """For `prefix-share`: per new id, how far its row moves from its first piece's towards the mean old row.

    t = min(1, ln(k + 1) / (0.5 * ln n_old)), k = number of new ids whose pieces start with the same old id
    (None for a new id without pieces). Why: the logit of a row (1 - t) * w_f + t * w_mean is
    (1 - t) * l_f + t * l_mean, and l_mean (the mean old logit) <= ln(Z_old / n_old) by Jensen, so where the
    first piece f has probability p_f >= n_old ** -0.5 among the old ids, l_f - l_mean >= 0.5 * ln n_old and
    each new row scores at most l_f - ln(k + 1): the k new ids starting with f take at most k / (k + 1) of p_f.
    """
    first = Counter(ids[0] for ids in sources if ids)
    scale = 0.5 * math.log(n_old)
    return [min(1.0, math.log(first[ids[0]] + 1) / scale) if ids else None for ids in sources]


def piece_weights(ids: list[int], method: str, output: bool) -> list[float]:
    """Weights of a new id's pieces (in order) for the subword methods; they sum to 1."""
    n = len(ids)
    if n == 0:
        return []
    if method == "first-last":  # tokensurgeon: embed_tokens <- last piece, lm_head <- first piece
        return [1.0 if k == (0 if output else n - 1) else 0.0 for k in range(n)]
    if method == "weighted-mean":  # 1..n towards the last piece (input) or the first (output)
        w = [float(n - k) if output else float(k + 1) for k in range(n)]
        return [x / sum(w) for x in w]
    return [1.0 / n] * n


def fill_new_rows(new, n_old: int, n_new: int, method: str, sources: list[list[int]], *, seed: int,
                  init_range: float, output: bool = False, interpolation: float = 0.5,
                  pad_output: bool | None = None, calibration: tuple[Any, float] | None = None,
                  info: dict[str, Any] | None = None):
    """Fill rows n_old.. of `new` in place from its first n_old rows; returns `new`.

    New rows (n_old..n_new-1) by `method` (see EmbedInitConfig); `output` says the matrix is lm_head (or
    a tied matrix), which decides the piece weights of first-last / weighted-mean; `pad_output` (default:
    `output`) whether the padding rows are an output matrix's.
    Padding rows (n_new..) = mean of the old rows, or PAD_SCALE times it for an output matrix: their logit
    is PAD_SCALE times the mean old logit. Where that is negative (measured on trained models, not
    guaranteed) they lie far below the logits that carry the probability (< 1e-6 of the mass on real text,
    tests/test_embed_methods.py; docs/embed_init.md).
    `calibrated`: the `mean` rows shifted per first-piece group (embed_init/calibrate.py) with `calibration` =
    (final hidden states of the base model on calibration text, share); its summary goes into `info`.
    `sources[k]` are the old ids for new id n_old + k. New rows are computed in fp32 and cast to the
    matrix dtype. Working in place lets the caller read the old matrix straight into `new[:n_old]`: peak
    memory is the grown matrix plus small fp32 chunks.
    """
    import torch

    old = new[:n_old]
    rows, hidden = new.shape
    mean_all = _mean_rows(old)
    added = n_new - n_old
    gen = torch.Generator().manual_seed(seed)
    if method in ("mean", "interpolation", "first-last", "weighted-mean", "prefix-share", "calibrated"):
        shares = prefix_share_weights(sources, n_old) if method == "prefix-share" else None
        # Sum each new id's weighted old rows with index_add_ (serial on CPU, so deterministic), chunk by chunk.
        for s in range(0, added, _MEAN_CHUNK):
            chunk = sources[s:s + _MEAN_CHUNK]
            if method == "prefix-share":
                chunk = [ids[:1] for ids in chunk]
            flat = torch.tensor([i for ids in chunk for i in ids], dtype=torch.long)
            seg = torch.tensor([k for k, ids in enumerate(chunk) for _ in ids], dtype=torch.long)
            sums = torch.zeros(len(chunk), hidden, dtype=torch.float32)
            counts = torch.tensor([len(ids) for ids in chunk], dtype=torch.float32)
            if method in ("mean", "interpolation", "calibrated"):
                sums.index_add_(0, seg, old[flat].to(torch.float32))
                block = sums / counts.clamp(min=1)[:, None]
            else:
                w = torch.tensor([x for ids in chunk for x in piece_weights(ids, method, output)], dtype=torch.float32)
                sums.index_add_(0, seg, old[flat].to(torch.float32) * w[:, None])
                block = sums
            if method == "interpolation":
                block = (1 - interpolation) * mean_all + interpolation * block
            elif method == "prefix-share":
                t = torch.tensor([x or 0.0 for x in shares[s:s + _MEAN_CHUNK]], dtype=torch.float32)[:, None]
                block = (1 - t) * block + t * mean_all
            empty = counts == 0
            block[empty] = mean_all
            new[n_old + s:n_old + s + len(chunk)] = block.to(old.dtype)
        if method == "calibrated":
            from embed_init.calibrate import apply_calibration

            if calibration is None:
                raise ValueError("method calibrated needs calibration=(hidden states, share)")
            summary = apply_calibration(new, n_old, n_new, calibration[0], sources, calibration[1])
            if info is not None:
                info.update(summary)
    elif method == "hf-mean":
        cov = _covariance(old, mean_all) * HF_MEAN_EPSILON
        chol, info = torch.linalg.cholesky_ex(cov)
        for s in range(0, added, _CHUNK_ROWS):
            k = min(_CHUNK_ROWS, added - s)
            if int(info) == 0:
                z = torch.randn(k, hidden, generator=gen, dtype=torch.float32)
                block = mean_all + z @ chol.T
            else:  # not positive definite: transformers falls back to the mean
                block = mean_all.expand(k, hidden)
            new[n_old + s:n_old + s + k] = block.to(old.dtype)
    elif method == "random":
        for s in range(0, added, _CHUNK_ROWS):
            k = min(_CHUNK_ROWS, added - s)
            block = torch.randn(k, hidden, generator=gen, dtype=torch.float32) * init_range
            new[n_old + s:n_old + s + k] = block.to(old.dtype)
    else:
        raise ValueError(method)
    if rows > n_new:
        pad_output = output if pad_output is None else pad_output
        new[n_new:] = (mean_all * PAD_SCALE if pad_output else mean_all).to(old.dtype)
    return new


def write_tokenizer(new_tokenizer: str | Path, out: Path) -> list[str]:
    """Put the new tokenizer into `out` as a HF folder (copy a folder; convert a bare .model)."""
    src = Path(new_tokenizer)
    if src.is_file() and src.suffix == ".json":  # a tokenizer.json or a tekken JSON (byte-level BPE)
        from common.bytelevel import load_bytelevel, write_hf_folder

        tok = load_bytelevel(src)
        return write_hf_folder(out, tok.data, tok.config or {"tokenizer_class": "PreTrainedTokenizerFast"},
                               tok.special_map)
    if src.is_dir():
        names = []
        for p in sorted(src.iterdir()):
            if p.is_file() and not p.name.startswith(".") and p.name != "manifest.json":
                shutil.copy2(p, out / p.name)
                names.append(p.name)
        return names
    from common.tokenizer_files import load_model_proto, sentencepiece_to_fast

    proto = load_model_proto(src)
    shutil.copyfile(src, out / "tokenizer.model")
    sentencepiece_to_fast(proto, src).save(str(out / "tokenizer.json"))
    spec = proto.trainer_spec
    piece = lambda i: proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None  # noqa: E731
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": spec.bos_id >= 0,
        "add_eos_token": False, "bos_token": piece(spec.bos_id), "eos_token": piece(spec.eos_id),
        "unk_token": piece(spec.unk_id), "pad_token": None, "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656})
    atomic_write_json(out / "special_tokens_map.json", {k: v for k, v in {
        "bos_token": piece(spec.bos_id), "eos_token": piece(spec.eos_id), "unk_token": piece(spec.unk_id)}.items() if v})
    return ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def _spm_sha256(path: str | Path) -> str:
    """sha256 of the tokenizer's defining file: tokenizer.model, else (byte-level) tokenizer.json."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.model" if (p / "tokenizer.model").exists() else p / "tokenizer.json"
    return file_sha256(p)


def output_methods(cfg: EmbedInitConfig, tied: bool, model_dir: Path) -> str:
    """The lm_head method: --output-method, else the default (untied, with --calibration text) or --method."""
    if tied and cfg.calibration and cfg.output_method in ("", "calibrated"):
        raise input_error(model_dir / CONFIG_FILE, "--calibration is given, but this model ties lm_head to "
                          "embed_tokens (one matrix), and calibrated rows are for an untied lm_head only",
                          "leave --calibration out (the tied matrix gets --method)")
    if not tied:
        return cfg.output_method or (DEFAULT_OUTPUT_METHOD if cfg.calibration else cfg.method)
    if cfg.output_method and cfg.output_method != cfg.method:
        raise input_error(model_dir / CONFIG_FILE, f"--output-method {cfg.output_method} differs from --method "
                          f"{cfg.method}, but this model ties lm_head to embed_tokens (one matrix)",
                          f"leave --output-method empty (the tied matrix gets --method {cfg.method}), or pass "
                          f"the method you want as --method"
                          + (f" ({cfg.output_method} is for lm_head only)" if cfg.output_method in OUTPUT_ONLY_METHODS
                             else ""))
    return cfg.method


def grow_embeddings(cfg: EmbedInitConfig) -> Path:
    """Write `cfg.out`: the checkpoint of `cfg.model` with embed_tokens/lm_head grown to the new tokenizer."""
    import torch

    started = time.time()
    out, model_dir = Path(cfg.out), Path(cfg.model)
    if out.exists() and model_dir.exists() and out.resolve() == model_dir.resolve():
        raise input_error(out, "--out is the --model folder", "write to a new folder")
    skip, rerun = guard(cfg, out, stage="embed_init", inputs={"model": model_dir, "old_tokenizer": cfg.old_tokenizer,
                                                              "new_tokenizer": cfg.new_tokenizer,
                                                              **listed("calibration", cfg.calibration)})
    if skip:
        return out
    ckpt = open_checkpoint(model_dir)
    old, new = load_pieces(cfg.old_tokenizer), load_pieces(cfg.new_tokenizer)
    check_extends(old, new)
    n_old, n_new = len(old), len(new)
    vocab_size = ckpt.config.get("vocab_size")
    if vocab_size != n_old:
        raise input_error(model_dir / CONFIG_FILE, f"vocab_size is {vocab_size} but the old tokenizer "
                          f"{old.path} has {n_old} pieces", "pass the tokenizer this model was trained with as "
                          "--old-tokenizer (its size must equal config.json's vocab_size)")
    embed, lm_head, tied = find_matrices(ckpt)
    output_method = output_methods(cfg, tied, model_dir)
    names = [embed] + ([lm_head] if lm_head else [])
    for name in names:
        info = ckpt.info(name)
        if len(info.shape) != 2 or info.shape[0] != n_old:
            raise input_error(info.file, f"tensor {name} has shape {list(info.shape)}, expected {n_old} rows "
                              "(config.json vocab_size)", "fix config.json or re-save the checkpoint")
    rows = padded_rows(n_new, cfg.pad_to_multiple_of)
    if rows == n_old:
        raise input_error(new.path, f"the new tokenizer adds no pieces to the old one ({n_old} pieces each)",
                          "pass the grown tokenizer (e.g. from `graft vocab merge`) as --new-tokenizer")
    sources = surface_sources(old, new)
    init_range = float(ckpt.config.get("initializer_range", 0.02))
    stats: dict[str, Any] = {}
    calibration, calibration_info = None, {}
    if output_method == "calibrated":  # one forward pass of the base model; freed before the matrices are read
        from embed_init.calibrate import calibration_hidden

        calibration = (calibration_hidden(model_dir, cfg.old_tokenizer, cfg.calibration, cfg.calibration_tokens),
                       cfg.calibration_share)

    def plan_for(name: str, seed: int, method: str, output: bool) -> TensorPlan:
        info = ckpt.info(name)

        def produce():
            t0 = time.time()
            grown = torch.empty(rows, info.shape[1], dtype=torch_dtype(info.dtype))
            ckpt.read_tensor(name, out=grown[:n_old])  # old rows read in place: no second copy
            # A tied matrix is read as embed_tokens (piece weights) and scored as lm_head (padding rows).
            fill_new_rows(grown, n_old, n_new, method, sources, seed=seed, init_range=init_range, output=output,
                          interpolation=cfg.interpolation, pad_output=output or tied,
                          calibration=calibration if method == "calibrated" else None, info=calibration_info)
            finite = all(bool(torch.isfinite(grown[s:s + _CHUNK_ROWS]).all()) for s in range(n_old, rows, _CHUNK_ROWS))
            stats[name] = {"old_shape": list(info.shape), "new_shape": list(grown.shape), "dtype": info.dtype,
                           "seconds": round(time.time() - t0, 3), "finite": finite}
            return grown
        return TensorPlan((rows, info.shape[1]), info.dtype, produce)

    # Tied weights stored twice get identical rows (same seed); untied lm_head draws its own.
    plan = {embed: plan_for(embed, cfg.seed, cfg.method, False)}
    if lm_head:
        plan[lm_head] = (plan_for(lm_head, cfg.seed, cfg.method, False) if tied
                         else plan_for(lm_head, cfg.seed + 1, output_method, True))
    remove_stale_temps(out)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        report = rewrite_checkpoint(ckpt, tmp, plan, link=cfg.link, progress=cfg.progress,
                                    move_to_new_shard=True, new_shard=new_shard_name(ckpt))
        # The model's chat template is kept (the new tokenizer's own, if it has one, replaces it below); its
        # other tokenizer files never are: they describe the old vocabulary.
        copy_side_files(model_dir, tmp, skip=lambda p: p.name == CONFIG_FILE
                        or (p.name in TOKENIZER_FILES and p.name != CHAT_TEMPLATE_FILE))
        config = dict(ckpt.config)
        config["vocab_size"] = rows
        atomic_write_json(tmp / CONFIG_FILE, config)
        tok_files = write_tokenizer(cfg.new_tokenizer, tmp)
        special = sum(1 for i in range(n_old, n_new) if new.kinds[i] == SPECIAL)
        write_manifest(
            tmp, stage="embed_init", config=cfg, started=started,
            inputs={"model": str(model_dir.resolve()), "old_tokenizer": str(Path(cfg.old_tokenizer).resolve()),
                    "new_tokenizer": str(Path(cfg.new_tokenizer).resolve()),
                    "old_tokenizer_sha256": _spm_sha256(cfg.old_tokenizer),
                    "new_tokenizer_sha256": _spm_sha256(cfg.new_tokenizer)},
            counts={"old_vocab": n_old, "new_vocab": n_new, "added": n_new - n_old, "rows": rows,
                    "padding_rows": rows - n_new, "special_added": special,
                    "without_old_pieces": sum(1 for ids in sources if not ids),
                    "shards_linked": len(report["linked"]), "shards_copied": len(report["copied"]),
                    "shards_rewritten": len(report["rewritten"]), "shards_new": len(report["new"]),
                    "shards_dropped": len(report["dropped"]), "total_size": report["total_size"]},
            method=cfg.method, output_method=output_method, tied=tied, tensors=stats, tokenizer_files=tok_files, rerun=rerun,
            shards={k: report[k] for k in ("linked", "copied", "rewritten", "new", "dropped")},
            shard_files=report["shard_files"], source_shards=report["source_shards"],
            # How many old pieces each new id's surface splits into (the `mean` row averages them);
            # 0 = special token or no usable piece: mean of all old rows.
            new_ids={"first": n_old, "pieces_per_new_id": [len(ids) for ids in sources],
                     "histogram": {str(k): v for k, v in sorted(Counter(map(len, sources)).items())}},
            prefix_share=_prefix_share_summary(sources, n_old) if output_method == "prefix-share" else None,
            calibration=calibration_info or None)
    return out


def _prefix_share_summary(sources: list[list[int]], n_old: int) -> dict[str, Any]:
    """Manifest record of `prefix-share`: how many new ids share each first piece, and the weights t."""
    first = Counter(ids[0] for ids in sources if ids)
    t = sorted(x for x in prefix_share_weights(sources, n_old) if x is not None)
    return {"first_pieces": len(first), "largest_group": max(first.values(), default=0),
            "group_size_histogram": {str(k): v for k, v in sorted(Counter(first.values()).items())},
            "t_min": t[0] if t else None, "t_median": t[len(t) // 2] if t else None, "t_max": t[-1] if t else None,
            "t_is_1": sum(1 for x in t if x >= 1.0)}


def load_grown_manifest(out: str | Path) -> dict[str, Any]:
    """The manifest of a finished `graft embed init` output (GraftError when missing or incomplete)."""
    out = Path(out)
    if not is_complete(out):
        raise input_error(out, "no finished `graft embed init` output here (manifest.json missing or not done)",
                          "run `graft embed init` first (re-run it if it was interrupted)")
    m = read_manifest(out)
    if m.get("stage") != "embed_init":
        raise input_error(out / MANIFEST, f"written by stage {m.get('stage')!r}, not embed_init",
                          "pass a folder written by `graft embed init`")
    return m


__all__ = ["grow_embeddings", "fill_new_rows", "surface_sources", "find_matrices", "padded_rows", "write_tokenizer",
           "load_grown_manifest"]
