"""`graft export gguf`: a merged checkpoint as one GGUF file, written by llama.cpp's own converter.

1. Sizes, before anything is converted (`check_vocab`): config.json `vocab_size`, the rows of `embed_tokens`
   and `lm_head`, and the tokenizer (HF's `len(tokenizer)` and what llama.cpp reads: tokenizer.model plus
   the added tokens of added_tokens.json / tokenizer_config.json) must agree. More tokenizer entries than
   rows is refused (llama.cpp would drop the extra tokens with a log warning); fewer is padding from
   `graft embed init --pad-to-multiple-of`, which llama.cpp writes as `[PAD<id>]` tokens of type UNUSED.
2. `convert_hf_to_gguf.py` of the pinned llama.cpp (export/llama_cpp.py) runs in a subprocess with its own
   gguf-py; its output is shown as it runs and its last error lines become ours (e.g. "Model X is not
   supported").
3. The written file is read back with gguf-py (`check_gguf`): token count = rows, tokenizer model "llama",
   every padded id UNUSED, every other id the tokenizer.model piece. Otherwise the file is deleted.

The file is written under a temporary name and renamed when checked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import GraftError, input_error
from export import llama_cpp
from export.config import GgufConfig

UNUSED = 5  # gguf.TokenType.UNUSED (llama.cpp's LLAMA_TOKEN_TYPE_UNUSED)


@dataclass
class VocabSizes:
    config: int  # config.json vocab_size
    embed_rows: int
    lm_head_rows: int | None  # None: tied, not stored
    tokenizer: int  # len(HF tokenizer) == what llama.cpp reads
    sentencepiece: int  # pieces in tokenizer.model (0: a byte-level tokenizer.json)

    @property
    def padding(self) -> int:
        return self.config - self.tokenizer


def _read_config(model: Path) -> dict[str, Any]:
    path = model / "config.json"
    if not path.is_file():
        raise input_error(model, "no config.json (not a Hugging Face checkpoint folder)",
                          "pass the output folder of `graft merge`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise input_error(path, f"not valid JSON ({e.msg})", "restore the file", line=e.lineno) from None


def _llama_cpp_added_ids(model: Path) -> list[int]:
    """Ids that llama.cpp's converter takes from added_tokens.json and tokenizer_config.json."""
    ids = []
    added = model / "added_tokens.json"
    if added.is_file():
        ids += [int(i) for i in json.loads(added.read_text(encoding="utf-8")).values()]
    tc = model / "tokenizer_config.json"
    if tc.is_file():
        ids += [int(i) for i in json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder", {})]
    return ids


def check_vocab(model: str | Path) -> VocabSizes:
    """The four vocabulary sizes, or a GraftError naming the file, the key and the fix."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from common.checkpoint import open_checkpoint
    from embed_init.grow import find_matrices

    model = Path(model)
    config = _read_config(model)
    spm_path = model / "tokenizer.model"
    bytelevel = not spm_path.is_file() and (model / "tokenizer.json").is_file()
    if bytelevel:
        from common.bytelevel import load_bytelevel

        load_bytelevel(model)  # a tokenizer.json that is not a byte-level BPE is refused here, naming what it is
    elif not spm_path.is_file():
        raise input_error(model, "no tokenizer files (tokenizer.model expected): llama.cpp's file holds the "
                                 "vocabulary", "copy the tokenizer folder (`graft vocab merge` output, or the "
                                 "base's tokenizer) into the checkpoint")
    if not isinstance(config.get("vocab_size"), int):
        raise input_error(model / "config.json", f"key 'vocab_size' is {config.get('vocab_size')!r}, not an integer",
                          "set it to the number of rows of model.embed_tokens.weight")
    vocab = config["vocab_size"]
    ckpt = open_checkpoint(model)
    embed, lm_head, _ = find_matrices(ckpt)
    rows = {}
    for name in [embed] + ([lm_head] if lm_head else []):
        info = ckpt.info(name)
        rows[name] = info.shape[0]
        if info.shape[0] != vocab:
            raise input_error(info.file, f"tensor {name} has {info.shape[0]} rows but config.json key 'vocab_size' "
                                         f"is {vocab}", f"set vocab_size to {info.shape[0]} in {model / 'config.json'} "
                                         "if the tensor is right, or re-run `graft embed init` / `graft merge` to "
                                         "rebuild the checkpoint")
    n_sp = 0 if bytelevel else spm.SentencePieceProcessor(model_file=str(spm_path)).get_piece_size()
    try:
        n_hf = len(AutoTokenizer.from_pretrained(str(model)))
    except Exception as e:  # noqa: BLE001 - any load failure is the tokenizer files' problem
        raise input_error(model, f"the Hugging Face tokenizer does not load ({type(e).__name__}: {e})",
                          "copy the tokenizer folder of `graft vocab merge` into the checkpoint") from None
    added = _llama_cpp_added_ids(model)
    n_llama = max([n_sp] + [i + 1 for i in added])
    if not bytelevel and n_hf != n_llama:
        raise input_error(model / "tokenizer.json", f"the Hugging Face tokenizer has {n_hf} tokens but llama.cpp "
                                                    f"would read {n_llama} (tokenizer.model has {n_sp} pieces, "
                                                    "plus added_tokens.json / tokenizer_config.json "
                                                    "'added_tokens_decoder')",
                          "write all tokenizer files from one tokenizer: copy the `graft vocab merge` output "
                          "folder into the checkpoint")
    if n_hf > vocab:
        raise input_error(model / "config.json", f"the tokenizer has {n_hf} tokens but key 'vocab_size' and "
                                                 f"{embed} have {vocab} rows: ids {vocab}..{n_hf - 1} have no "
                                                 "embedding (llama.cpp would drop those tokens)",
                          "grow the checkpoint to this tokenizer with `graft embed init --new-tokenizer` "
                          "(then train and merge), or pass the checkpoint that belongs to this tokenizer")
    return VocabSizes(config=vocab, embed_rows=rows[embed], lm_head_rows=rows.get(lm_head) if lm_head else None,
                      tokenizer=n_hf, sentencepiece=n_sp)


# Runs convert_hf_to_gguf.py with its pre-tokenizer detection answering NAME: the converter hashes the ids of a
# test text and knows only the hashes of published tokenizers, so it refuses any graft of a byte-level base.
_WITH_PRE = """import runpy, sys
src, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_converter(src: Path, model: Path, out_file: Path, outtype: str, progress: bool = True,
                  pre_tokenizer: str | None = None) -> float:
    """Run llama.cpp's convert_hf_to_gguf.py (told the byte-level pre-tokenizer's name when given); returns
    seconds. Its errors become a GraftError naming the model."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # use the pinned gguf-py
    env.setdefault("HF_HUB_OFFLINE", "1")
    args = [str(model), "--outfile", str(out_file), "--outtype", outtype]
    cmd = ([sys.executable, "-c", _WITH_PRE, str(src), pre_tokenizer] + args if pre_tokenizer
           else [sys.executable, str(src / "convert_hf_to_gguf.py")] + args)
    started = time.time()
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for raw in iter(proc.stdout.readline, b""):
        line = raw.decode("utf-8", "replace")
        tail.append(line.rstrip())
        if progress:
            sys.stderr.write(f"  [llama.cpp] {line}")
            sys.stderr.flush()
    proc.wait()
    if proc.returncode != 0:
        errors = [t for t in tail if "error" in t.lower() or "not supported" in t.lower()] or list(tail)[-5:]
        raise input_error(model, f"llama.cpp's convert_hf_to_gguf.py ({llama_cpp.REVISION}) failed with exit "
                                 f"{proc.returncode}: " + " | ".join(e.strip() for e in errors[-6:]),
                          "an architecture llama.cpp's converter does not support cannot be exported (list: python "
                          f"{src / 'convert_hf_to_gguf.py'} --print-supported-models); otherwise read its log "
                          "(shown unless --no-progress)")
    return time.time() - started


def import_gguf(src: Path):
    """gguf-py of the pinned llama.cpp (not a PyPI `gguf` that may be installed)."""
    path = str(src / "gguf-py")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf

    if not str(Path(gguf.__file__).resolve()).startswith(str(Path(path).resolve())):
        raise GraftError(f"`import gguf` found {gguf.__file__}, not {path}. Fix: run graft in a fresh process "
                         "or uninstall the other gguf package")
    return gguf


def check_gguf(src: Path, path: Path, model: Path, sizes: VocabSizes, pre_tokenizer: str | None = None) -> dict[str, Any]:
    """Read the written file back: vocabulary size, padded ids UNUSED, the pieces as in tokenizer.model (byte-level:
    tokenizer model gpt2, the given pre-tokenizer, the tokens as in tokenizer.json)."""
    gguf = import_gguf(src)
    reader = gguf.GGUFReader(str(path))

    def field(key: str):
        f = reader.get_field(key)
        if f is None:
            raise input_error(path, f"llama.cpp wrote no {key!r}", "report this with the converter's output")
        return f

    tok_field = field("tokenizer.ggml.tokens")
    tokens = [bytes(tok_field.parts[i]) for i in tok_field.data]
    types = [int(field("tokenizer.ggml.token_type").parts[i][0]) for i in field("tokenizer.ggml.token_type").data]
    tok_model = bytes(field("tokenizer.ggml.model").parts[-1]).decode()
    problems = []
    want = "gpt2" if not sizes.sentencepiece else "llama"
    if tok_model != want:
        problems.append(f"tokenizer model {tok_model!r}, expected {want!r}")
    if not sizes.sentencepiece:
        pre = bytes(field("tokenizer.ggml.pre").parts[-1]).decode()
        if pre != pre_tokenizer:
            problems.append(f"pre-tokenizer {pre!r}, expected {pre_tokenizer!r}")
    if len(tokens) != sizes.config:
        problems.append(f"{len(tokens)} tokens, expected {sizes.config} (config.json vocab_size)")
    pad_ids = range(sizes.tokenizer, sizes.config)
    not_unused = [i for i in pad_ids if i < len(types) and types[i] != UNUSED]
    if not_unused:
        problems.append(f"{len(not_unused)} padded ids are not UNUSED tokens (e.g. {not_unused[:5]})")
    expected = _expected_tokens(model, sizes)
    wrong = [i for i in range(min(len(expected), len(tokens))) if tokens[i] != expected[i].encode()]
    if wrong:
        problems.append(f"{len(wrong)} tokens differ from the tokenizer (e.g. id {wrong[0]}: "
                        f"{tokens[wrong[0]]!r} vs {expected[wrong[0]]!r})")
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors if t.name in ("token_embd.weight", "output.weight")}
    for name, shape in shapes.items():
        if shape[-1] != sizes.config:  # gguf lists ne0 first: [hidden, vocab]
            problems.append(f"tensor {name} has shape {shape}, expected {sizes.config} rows")
    if problems:
        raise input_error(path, "the converted file does not match the checkpoint: " + "; ".join(problems),
                          "report this with the converter's output; the file was not kept")
    arch = bytes(field("general.architecture").parts[-1]).decode()
    return {"architecture": arch, "tokens": len(tokens), "padded_unused": len(pad_ids), "tensors": len(reader.tensors),
            "tensor_shapes": shapes}


def _expected_tokens(model: Path, sizes: VocabSizes) -> list[str]:
    """The token strings the file must hold: tokenizer.model's pieces, or tokenizer.json's tokens by id."""
    if sizes.sentencepiece:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
        return [sp.id_to_piece(i) for i in range(sizes.sentencepiece)]
    from common.bytelevel import load_bytelevel

    by_id = load_bytelevel(model).id_to_token()
    return [by_id[i] for i in range(sizes.tokenizer)]


def export_gguf(cfg: GgufConfig) -> Path:
    """Write the GGUF file (or folder with model-OUTTYPE.gguf + manifest.json); returns the .gguf path."""
    from common.io import atomic_path, file_sha256, write_manifest

    started = time.time()
    cfg.validate()
    model, out = Path(cfg.model), Path(cfg.out)
    as_folder = out.suffix != ".gguf"
    if out.exists() and not cfg.overwrite:
        raise input_error(out, "output already exists", "pass --overwrite to replace it, or choose another --out")
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if cfg.progress else (lambda msg: None)
    sizes = check_vocab(model)  # first: a wrong checkpoint is reported before llama.cpp is looked for
    if not sizes.sentencepiece and not cfg.pre_tokenizer:
        raise input_error(model, "a byte-level tokenizer (tokenizer.json): llama.cpp's converter recognises its "
                                 "pre-tokenizer by a hash of ids, which the graft changed",
                          "pass --pre-tokenizer with llama.cpp's name of the base's: llama-bpe (Llama-3), qwen2, "
                          "tekken (Mistral-Nemo)")
    src = llama_cpp.source_dir(cfg.llama_cpp)
    say(f"vocabulary: config {sizes.config}, embed_tokens {sizes.embed_rows}, lm_head "
        f"{sizes.lm_head_rows if sizes.lm_head_rows is not None else 'tied'}, tokenizer {sizes.tokenizer}"
        + (f" (+{sizes.padding} padded rows -> unused tokens)" if sizes.padding else ""))
    say(f"converting {model} with llama.cpp {llama_cpp.REVISION} ({src}) to {cfg.outtype}")
    with atomic_path(out) as tmp:
        if as_folder:
            tmp.mkdir(parents=True)
            target = tmp / f"model-{cfg.outtype}.gguf"
        else:
            target = tmp
        seconds = run_converter(src, model, target, cfg.outtype, cfg.progress, cfg.pre_tokenizer if not
                                sizes.sentencepiece else None)
        if not target.is_file():
            raise input_error(model, f"llama.cpp's converter exited 0 but wrote no {target.name}",
                              "read its output above")
        checked = check_gguf(src, target, model, sizes, cfg.pre_tokenizer)
        if as_folder:
            write_manifest(tmp, stage="export.gguf", config=cfg, started=started,
                           inputs={"model": str(model.resolve())},
                           counts={"vocab_size": sizes.config, "tokenizer": sizes.tokenizer,
                                   "padded_unused": sizes.padding, "bytes": target.stat().st_size},
                           llama_cpp={"revision": llama_cpp.REVISION, "from": f"{llama_cpp.PACKAGE} "
                                      f"{llama_cpp.VERSION} sdist", "source": str(src)},
                           gguf={"file": target.name, "sha256": file_sha256(target), **checked},
                           sizes=asdict(sizes), convert_seconds=round(seconds, 1))
    path = out / f"model-{cfg.outtype}.gguf" if as_folder else out
    say(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {checked['tokens']} tokens, "
        f"{checked['padded_unused']} unused padding, {time.time() - started:.0f} s)")
    return path


__all__ = ["export_gguf", "check_vocab", "check_gguf", "run_converter", "VocabSizes"]
