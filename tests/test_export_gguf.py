"""graft export gguf: llama.cpp's own converter, checked by llama.cpp itself (llama-cpp-python, same pin).

The model is a tiny Mixtral with Mixtral's real tokenizer grafted (`graft vocab merge`), grown with
`graft embed init --pad-to-multiple-of 64`, trained two QLoRA steps and merged (tests/tiny_export.py).

Tests marked `llama_cpp` need the pinned converter (.cache/llama.cpp/) and the llama-cpp-python wheel built
from the same sdist: `make test-export` builds/installs both and runs them (with GRAFT_REQUIRE_LLAMA_CPP=1,
a missing piece fails instead of skipping). Size checks run everywhere.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import GraftError
from export import llama_cpp
from export.config import GgufConfig
from export.gguf import check_gguf, check_vocab, export_gguf
from tiny_export import TRAIN_LINES, grafted_mixtral

ROOT = Path(__file__).resolve().parents[1]
REQUIRE = os.environ.get("GRAFT_REQUIRE_LLAMA_CPP") == "1"


def _missing(what: str):
    msg = f"{what}; `make test-export` builds and installs it"
    if REQUIRE:
        pytest.fail(msg + " (GRAFT_REQUIRE_LLAMA_CPP=1)")
    pytest.skip(msg)


@pytest.fixture(scope="module")
def src() -> Path:
    path = llama_cpp.extract_source(download=False)
    if path is None:
        _missing(f"no cached llama.cpp converter ({llama_cpp.REVISION})")
    return path


@pytest.fixture(scope="module")
def Llama(src):
    if llama_cpp.installed() != llama_cpp.VERSION:
        _missing(f"llama-cpp-python {llama_cpp.VERSION} is not installed")
    from llama_cpp import Llama

    return Llama


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    return grafted_mixtral(tmp_path_factory.getbasetemp() / "export_ws")


@pytest.fixture(scope="module")
def f32(ws, src, tmp_path_factory) -> Path:
    return export_gguf(GgufConfig(model=str(ws["merged"]), out=str(tmp_path_factory.mktemp("gguf") / "m-f32.gguf"),
                                  outtype="f32", progress=False))


def _linked_copy(src_dir: Path, dest: Path) -> Path:
    shutil.copytree(src_dir, dest, copy_function=os.link)
    return dest


def _set_config(folder: Path, **kv) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(kv)
    path.unlink()  # hard link: never write through to the original
    path.write_text(json.dumps(cfg))


# ---------------------------------------------------------------- bad input (no llama.cpp needed)

def test_sizes_disagree_error_before_conversion(ws, tmp_path):
    nowhere = str(tmp_path / "no-llama-cpp")  # the converter is looked for only after the sizes pass
    bad = _linked_copy(ws["merged"], tmp_path / "bad")
    _set_config(bad, vocab_size=33215)
    with pytest.raises(GraftError, match=r"model-grown-embeddings\.safetensors: tensor model\.embed_tokens\.weight "
                                         r"has 33216 rows but config\.json key 'vocab_size' is 33215\. Fix: set "
                                         r"vocab_size to 33216"):
        export_gguf(GgufConfig(model=str(bad), out=str(tmp_path / "x.gguf"), llama_cpp=nowhere, progress=False))
    # the grafted tokenizer on the 32,000-row base: ids 32000.. would have no embedding
    small = _linked_copy(ws["base"], tmp_path / "small")
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ws["merged"] / name, small / name)
    with pytest.raises(GraftError, match=r"small/config\.json: the tokenizer has 33\d\d\d tokens but key 'vocab_size' "
                                         r"and model\.embed_tokens\.weight have 32000 rows.*Fix: grow the checkpoint"):
        export_gguf(GgufConfig(model=str(small), out=str(tmp_path / "x.gguf"), llama_cpp=nowhere, progress=False))
    # no tokenizer.model: only a byte-level tokenizer.json is exported without one; this one is SentencePiece's
    (small / "tokenizer.model").unlink()
    with pytest.raises(GraftError, match=r"small/tokenizer\.json: is not a tokenizer vocab-graft can grow: it is a "
                                         r"BPE without a ByteLevel pre-tokenizer"):
        export_gguf(GgufConfig(model=str(small), out=str(tmp_path / "x.gguf"), llama_cpp=nowhere, progress=False))
    assert not list(tmp_path.glob("*.gguf*"))


def test_missing_converter_says_how_to_get_it(ws, tmp_path):
    with pytest.raises(GraftError, match=r"no-llama-cpp: no llama\.cpp converter here.*Fix: run `make llama-cpp`"):
        export_gguf(GgufConfig(model=str(ws["merged"]), out=str(tmp_path / "x.gguf"),
                               llama_cpp=str(tmp_path / "no-llama-cpp"), progress=False))


# ---------------------------------------------------------------- llama.cpp's converter

@pytest.mark.llama_cpp
def test_unsupported_architecture_gets_llama_cpps_message(ws, src, tmp_path):
    odd = _linked_copy(ws["merged"], tmp_path / "odd")
    _set_config(odd, architectures=["VocabGraftToyForCausalLM"])
    with pytest.raises(GraftError, match=r"odd: llama\.cpp's convert_hf_to_gguf\.py \(0c1e57098\) failed with exit 1:"
                                         r".*Model VocabGraftToyForCausalLM is not supported"):
        export_gguf(GgufConfig(model=str(odd), out=str(tmp_path / "x.gguf"), progress=False))
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.llama_cpp
def test_padded_rows_become_unused_tokens(ws, src, f32):
    from export.gguf import import_gguf

    gguf = import_gguf(src)
    reader = gguf.GGUFReader(str(f32))
    f = reader.get_field("tokenizer.ggml.token_type")
    types = [int(f.parts[i][0]) for i in f.data]
    tok = reader.get_field("tokenizer.ggml.tokens")
    tokens = [bytes(tok.parts[i]).decode() for i in tok.data]
    from transformers import AutoTokenizer

    cfg = json.loads((ws["merged"] / "config.json").read_text())
    n_tok = len(AutoTokenizer.from_pretrained(str(ws["merged"])))
    assert cfg["vocab_size"] % 64 == 0 and len(types) == cfg["vocab_size"] > n_tok
    assert types[n_tok:] == [gguf.TokenType.UNUSED] * (cfg["vocab_size"] - n_tok)
    assert tokens[n_tok] == f"[PAD{n_tok}]"
    assert all(t != gguf.TokenType.UNUSED for t in types[:n_tok])
    assert tokens.index("<|im_start|>") >= 32000 and types[tokens.index("<|im_start|>")] == gguf.TokenType.CONTROL
    # the check run after each conversion catches a file whose padding is not UNUSED, or a short vocabulary
    sizes = check_vocab(ws["merged"])
    assert check_gguf(src, f32, ws["merged"], sizes)["padded_unused"] == cfg["vocab_size"] - n_tok
    with pytest.raises(GraftError, match=r"m-f32\.gguf: the converted file does not match the checkpoint: "
                                         r"10 padded ids are not UNUSED tokens"):
        check_gguf(src, f32, ws["merged"], dataclasses.replace(sizes, tokenizer=n_tok - 10))
    with pytest.raises(GraftError, match=rf"{cfg['vocab_size']} tokens, expected {cfg['vocab_size'] + 64}"):
        check_gguf(src, f32, ws["merged"], dataclasses.replace(sizes, config=cfg["vocab_size"] + 64))


# ---------------------------------------------------------------- checked by llama.cpp itself

def _held_out() -> list[str]:
    from demo import sources

    zh = [t for t in sources.people_daily_lines()[TRAIN_LINES:TRAIN_LINES + 150]]
    en = [t for t in sources.english_paragraphs()[-60:]]
    return zh + en


def _differences(llama, encode, lines) -> list[int]:
    return [i for i, t in enumerate(lines) if llama.tokenize(t.encode(), add_bos=False, special=False) != encode(t)]


def _base_checkpoint(tmp: Path) -> Path:
    """The unextended base as users have it: the tiny Mixtral with Mixtral's own tokenizer files."""
    from demo.tiny import save_tiny_mixtral
    from demo import sources
    from embed_init.grow import write_tokenizer

    out = save_tiny_mixtral(tmp / "base")
    write_tokenizer(sources.base_tokenizer_model(), out)
    return out


@pytest.mark.llama_cpp
def test_llama_cpp_tokenizes_as_sentencepiece_and_hf(ws, f32, Llama, tmp_path, capsys):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    lines = _held_out()
    counts = {}
    for name, model_dir, gguf_path in (
            ("base", (b := _base_checkpoint(tmp_path)), export_gguf(GgufConfig(
                model=str(b), out=str(tmp_path / "base.gguf"), outtype="f32", progress=False))),
            ("grafted", ws["merged"], f32)):
        llama = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
        sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        hf = AutoTokenizer.from_pretrained(str(model_dir))
        counts[name] = {"sentencepiece": _differences(llama, sp.encode, lines),
                        "hf_fast": _differences(llama, lambda t: hf.encode(t, add_special_tokens=False), lines),
                        "added_ids_used": sum(i >= 32000 for t in lines for i in sp.encode(t))}
    with capsys.disabled():
        print(f"\nheld-out lines: {len(lines)} (150 People's Daily after the vocabulary's {TRAIN_LINES}, 60 pydoc); "
              "lines where llama.cpp differs: " + json.dumps({k: {e: len(v) if isinstance(v, list) else v
                                                                   for e, v in c.items()} for k, c in counts.items()}))
    assert counts["grafted"]["added_ids_used"] > 1000 and counts["base"]["added_ids_used"] == 0  # not vacuous
    for encoder in ("sentencepiece", "hf_fast"):
        assert set(counts["grafted"][encoder]) <= set(counts["base"][encoder]), encoder
    assert counts["grafted"]["sentencepiece"] == [] and counts["grafted"]["hf_fast"] == []


@pytest.mark.llama_cpp
def test_every_added_piece_is_one_token_in_llama_cpp(ws, f32, Llama, capsys):
    rows = [line.split("\t") for line in (ws["tok"] / "added_pieces.tsv").read_text().splitlines()[1:]]
    # A piece is text, not the start of a text: no dummy-prefix space (as `graft vocab merge` checks it).
    llama = Llama(model_path=str(f32), vocab_only=True, verbose=False,
                  kv_overrides={"tokenizer.ggml.add_space_prefix": False})
    bad = [(int(i), p) for i, p, *_ in rows
           if llama.tokenize(p.replace("\u2581", " ").encode(), add_bos=False, special=False) != [int(i)]]
    with capsys.disabled():
        print(f"\nadded pieces: {len(rows)}, not one token in llama.cpp: {len(bad)}")
    assert len(rows) > 1000 and bad == []
    im_start = llama.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert len(im_start) == 1 and im_start[0] >= 32000


PROMPTS = ("人民日报记者报道，今年全国粮食产量再创新高。", "The tokenizer splits text into pieces.",
           "北京 Beijing 2026年12月")


@pytest.mark.llama_cpp
def test_f32_logits_equal_hf(ws, f32, Llama, capsys):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ws["merged"]))
    model = AutoModelForCausalLM.from_pretrained(str(ws["merged"]), dtype=torch.float32).eval()
    llama = Llama(model_path=str(f32), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0)
    rel = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)  # BOS + text
        assert ids == llama.tokenize(prompt.encode(), add_bos=True, special=False)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        llama.reset()
        llama.eval(ids)
        got = np.asarray(llama.scores[:len(ids)], dtype=np.float32)
        assert got.shape == ref.shape
        rel.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    with capsys.disabled():
        print(f"\nf32 GGUF vs HF logits, max |diff| / max |HF| per prompt: {[f'{r:.2e}' for r in rel]}")
    assert max(rel) <= 1e-3


def _readme_export_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Export to GGUF"):]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    return [line for line in block.splitlines() if line.startswith("$G export gguf")]


@pytest.mark.llama_cpp
def test_readme_q8_0_example_loads_and_generates(ws, Llama, tmp_path, capsys):
    """The README's command, as written (model and output paths moved to this test's folder)."""
    (cmd,) = _readme_export_commands()
    runs = tmp_path / "runs" / "readme"
    _linked_copy(ws["merged"], runs / "merged")
    cmd = cmd.replace("$G", f"{sys.executable} -m workflows.cli")
    proc = subprocess.run(["bash", "-e", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (path,) = runs.glob("*q8_0.gguf")
    assert "[llama.cpp] INFO:hf-to-gguf:Model successfully exported" in proc.stderr  # progress shown
    llama = Llama(model_path=str(path), n_ctx=128, verbose=False, n_threads=2, seed=0)
    out = llama("人民日报", max_tokens=12, temperature=0.0)
    sample = out["choices"][0]["text"]
    with capsys.disabled():
        print(f"\nq8_0 ({path.stat().st_size / 2**20:.1f} MiB) greedy from '人民日报': {sample!r} "
              f"({out['usage']['completion_tokens']} tokens)")
    assert out["usage"]["completion_tokens"] == 12 and sample


@pytest.mark.llama_cpp
def test_workflow_export_stage(ws, src, tmp_path):
    from workflows.spec import load_workflow

    wf = tmp_path / "export.toml"
    wf.write_text(f'[workflow]\nname = "exp"\nruns = "{tmp_path / "runs"}"\n\n'
                  f'[gguf]\nkind = "export.gguf"\nmodel = "{ws["merged"]}"\nouttype = "f16"\nprogress = false\n')
    assert load_workflow(wf).stage("gguf").kind.name == "export.gguf"
    from workflows.cli import main

    assert main(["run", str(wf)]) == 0
    out = tmp_path / "runs" / "exp" / "gguf"
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "done" and m["llama_cpp"]["revision"] == llama_cpp.REVISION
    assert m["gguf"]["tokens"] == m["counts"]["vocab_size"] and m["counts"]["padded_unused"] > 0
    assert (out / "model-f16.gguf").stat().st_size > 1_000_000
