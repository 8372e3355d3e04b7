"""Bits per byte (workflows/evaluate.py) against direct computations, and the report's Markdown/HTML twins."""
from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def tiny(base_model_path):
    from transformers import MixtralForCausalLM

    from demo.tiny import tiny_mixtral_config
    from common.tokenizer_files import load_fast_tokenizer

    torch.manual_seed(0)
    model = MixtralForCausalLM(tiny_mixtral_config(hidden=32, intermediate=64, layers=1)).eval()
    return model, load_fast_tokenizer(base_model_path)


def _direct_nats(model, ids: list[int], context: int | None) -> float:
    """-sum log p(ids[t] | previous) with the whole prefix (context=None) or the last `context` tokens."""
    import torch.nn.functional as F

    total = 0.0
    with torch.no_grad():
        if context is None:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            return float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
        for t in range(1, len(ids)):
            window = ids[max(0, t - context):t]
            logits = model(input_ids=torch.tensor([window])).logits[0, -1]
            total += float(F.cross_entropy(logits[None], torch.tensor([ids[t]])))
    return total


def test_bits_per_byte_matches_direct_computation(tiny, news_lines, english_paragraphs):
    from workflows.evaluate import bits_per_byte

    model, tok = tiny
    texts = [news_lines[3][:16], english_paragraphs[5][:40], "短"]
    encs = [[1] + tok.encode(t, add_special_tokens=False).ids for t in texts]
    r = bits_per_byte(model, tok, texts, bos=1, max_len=512, batch_size=2)
    direct = sum(_direct_nats(model, ids, None) for ids in encs)
    assert r["tokens"] == sum(len(e) - 1 for e in encs)
    assert r["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert r["nats"] == pytest.approx(direct, rel=1e-5)
    assert r["bpb"] == pytest.approx(direct / math.log(2) / r["bytes"], rel=1e-5)

    # Short windows: every token is still predicted once, with the window's context only.
    r2 = bits_per_byte(model, tok, texts, bos=1, max_len=2, batch_size=3)
    assert r2["tokens"] == r["tokens"]
    assert r2["nats"] == pytest.approx(sum(_direct_nats(model, ids, 1) for ids in encs), rel=1e-5)


def test_report_markdown_and_html_say_the_same():
    from analysis.doc import Doc

    d = Doc()
    d.h(2, "Dev bits per byte")
    d.p("Chosen: **chars 2500** -> `a/b.model`")
    d.table(["model", "bpb"], [["base | x", 3.14159], ["trained", 2]])
    d.img("bpb.png", "bpb")
    d.code("中国经济 <b>")
    md, html = d.markdown(), d.html("t")
    assert "## Dev bits per byte" in md and "<h2>Dev bits per byte</h2>" in html
    assert "**chars 2500** -> `a/b.model`" in md and "<b>chars 2500</b> -&gt; <code>a/b.model</code>" in html
    assert "| base \\| x | 3.1416 |" in md and "<td>base | x</td><td>3.1416</td>" in html
    assert "![bpb](bpb.png)" in md and "<img src='bpb.png' alt='bpb'>" in html
    assert "中国经济 &lt;b&gt;" in html


# ---------------------------------------------------------------- BOS: one setting, train-time eval == eval stage

@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from tiny_continual import tiny_workspace

    return tiny_workspace(tmp_path_factory.mktemp("ws"))


def _one_document_corpus(tmp_path, ws, doc: str, bos: bool):
    """A dev corpus holding `doc` as exactly one block ([BOS] ids EOS), and a train corpus of the same block size."""
    from common.tokenizer_files import load_fast_tokenizer
    from demo import sources
    from corpus.blocks import load_blocks
    from corpus.prepare import PrepareConfig, prepare

    n = len(load_fast_tokenizer(ws["tok"]).encode(doc, add_special_tokens=False).ids)
    block = n + 1 + int(bos)
    dev_file = sources.write_jsonl(tmp_path / "dev.jsonl", [doc])
    train_file = sources.write_jsonl(tmp_path / "train.jsonl", list(sources.people_daily_lines()[100:300])
                                     + list(sources.english_paragraphs()[100:140]))
    common = dict(tokenizer=str(ws["tok"]), block_size=block, bos=bos, progress=False)
    dev = prepare(PrepareConfig(name="dev", files=[str(dev_file)], out=str(tmp_path / f"dev{bos}"), split="1:999",
                                **common))
    train = prepare(PrepareConfig(name="train", files=[str(train_file)], out=str(tmp_path / f"train{bos}"),
                                  split="1:0", **common))
    blocks = load_blocks(dev, "dev")
    assert len(blocks) == 1 and len(load_blocks(dev, "train")) == 0  # the whole document is the one dev block
    return dev_file, dev, train, blocks[0]["input_ids"]


def test_train_time_eval_and_eval_stage_give_the_same_bits_per_byte(ws, tmp_path):
    """Same text, same weights: the trainer's dev bpb at step 0 (LoRA B = 0, embedding copies = originals, so
    the model is the NF4 base) equals the eval stage's bpb of the base loaded in NF4, when the dev block holds
    exactly that one document. Both read BOS from the corpus manifest (prepare's default: on)."""
    import csv

    from common.io import read_manifest
    from tiny_continual import tiny_train_config
    from continual.train import train
    from demo import sources
    from workflows.evaluate import EvalConfig, evaluate_models

    doc = sources.people_daily_lines()[7] + " " + sources.english_paragraphs()[3][:200]
    dev_file, dev, train_corpus, block = _one_document_corpus(tmp_path, ws, doc, bos=True)
    assert block[0] == 1 and block[-1] == 2  # BOS ... EOS: prepare's default puts BOS first

    run = train(tiny_train_config(ws, tmp_path / "run", train_data=str(train_corpus), dev_data=str(dev),
                                  embeddings="full", max_steps=1, eval_every=1, save_every=0, lora_dropout=0.0))
    assert read_manifest(run)["bos"] is True
    with open(run / "metrics.csv", newline="") as f:
        step0 = next(r for r in csv.DictReader(f) if r["step"] == "0")
    ev = evaluate_models(EvalConfig(models=[str(ws["base"])], labels=["base"], dev=[str(dev_file)],
                                    out=str(tmp_path / "eval"), corpus=str(dev), load="nf4", max_len=len(block)))
    got = read_manifest(ev)
    r = got["results"]["base"]["dev"]
    assert got["bos"] is True and got["results"]["base"]["load"]["mode"] == "nf4"
    assert r["bytes"] == len(doc.encode("utf-8")) == read_manifest(run)["counts"]["dev_bytes"]
    assert r["tokens"] == len(block) - 1
    assert r["bpb"] == pytest.approx(float(step0["dev_bpb"]), rel=1e-6)
    assert r["loss"] == pytest.approx(float(step0["dev_loss"]), rel=1e-6)

    # The setting matters: scoring the same text without BOS (the old eval/prepare mismatch) gives another figure.
    _, nobos, _, nobos_block = _one_document_corpus(tmp_path / "nobos", ws, doc, bos=False)
    assert nobos_block[0] != 1
    ev2 = evaluate_models(EvalConfig(models=[str(ws["base"])], labels=["base"], dev=[str(dev_file)],
                                     out=str(tmp_path / "eval2"), corpus=str(nobos), load="nf4", max_len=len(block)))
    assert read_manifest(ev2)["bos"] is False
    assert abs(read_manifest(ev2)["results"]["base"]["dev"]["bpb"] - r["bpb"]) > 1e-3


def test_eval_stage_reads_bos_from_corpus_and_train_folders(ws, tmp_path):
    import json

    from workflows.evaluate import DEFAULT_BOS, corpus_bos

    assert corpus_bos("") is DEFAULT_BOS is True
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "manifest.json").write_text(json.dumps({"stage": "corpus.prepare", "status": "done", "bos": False}))
    assert corpus_bos(str(prep)) is False
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"stage": "continual.train", "status": "done", "bos": None}))
    with pytest.raises(Exception, match=r"run/manifest.json: records no `bos`.*Fix: set `corpus`"):
        corpus_bos(str(run))
    with pytest.raises(Exception, match=r"has no manifest.json.*Fix: set `corpus`"):
        corpus_bos(str(tmp_path))


def test_bits_per_byte_predicts_eos_after_each_document(tiny, news_lines):
    from workflows.evaluate import bits_per_byte

    model, tok = tiny
    texts = [news_lines[4][:20], news_lines[9][:30]]
    encs = [[1] + tok.encode(t, add_special_tokens=False).ids + [2] for t in texts]
    r = bits_per_byte(model, tok, texts, bos=1, eos=2, max_len=512, batch_size=3)
    assert r["tokens"] == sum(len(e) - 1 for e in encs)
    assert r["bytes"] == sum(len(t.encode("utf-8")) for t in texts)  # EOS is predicted but adds no bytes
    assert r["tokens_per_byte"] == (r["tokens"] - len(texts)) / r["bytes"]  # the tokenizer's text tokens only
    assert r["nats"] == pytest.approx(sum(_direct_nats(model, e, None) for e in encs), rel=1e-5)


# ---------------------------------------------------------------- loading that fits the machine

@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    from demo.tiny import save_tiny_mixtral

    out = tmp_path_factory.mktemp("ckpt")
    save_tiny_mixtral(out)
    return out


def _budget(monkeypatch, ram: int, gpus: list[int] | None = None):
    import continual.load as L

    monkeypatch.setattr(L, "available_ram", lambda: ram)
    monkeypatch.setattr(L, "free_gpu_memory", lambda: list(gpus or []))


def test_checkpoint_params_counts_what_nf4_quantizes(small_ckpt):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from continual.model import load_base_4bit
    from continual.load import checkpoint_params

    n = checkpoint_params(small_ckpt)
    full = AutoModelForCausalLM.from_pretrained(str(small_ckpt))
    assert n["total"] == sum(p.numel() for p in full.parameters())
    q = load_base_4bit(small_ckpt, torch.float32)
    assert n["quantized"] == sum(m.in_features * m.out_features for m in q.modules()
                                 if isinstance(m, bnb.nn.Linear4bit)) > 0


def test_load_rule_full_then_nf4_then_error(small_ckpt, monkeypatch):
    from common.errors import GraftError
    from continual.load import checkpoint_params, plan_load

    n = checkpoint_params(small_ckpt)
    full_fp32 = n["total"] * 4
    _budget(monkeypatch, ram=2 * full_fp32 + 2)   # half the RAM holds the fp32 model
    p = plan_load(small_ckpt)
    assert (p.mode, p.dtype, p.device, p.device_map) == ("full", "float32", "cpu", None)
    _budget(monkeypatch, ram=2 * full_fp32 - 2)   # it does not, but NF4 does
    p = plan_load(small_ckpt)
    assert p.mode == "nf4" and p.need["nf4"] < p.budget < p.need["full"]
    assert "no GPU" in p.rule and "50%" in p.rule
    _budget(monkeypatch, ram=p.need["nf4"])       # nothing fits: an error naming the folder, the key and the fix
    with pytest.raises(GraftError, match=rf"{small_ckpt}: the model .* does not fit.*Fix: .*`load = \"nf4\"`"):
        plan_load(small_ckpt)
    assert plan_load(small_ckpt, load="full").mode == "full"  # forced: no size check
    _budget(monkeypatch, ram=0, gpus=[full_fp32, full_fp32])  # GPUs: bf16 spread with device_map auto
    p = plan_load(small_ckpt)
    assert (p.mode, p.dtype, p.device, p.device_map) == ("full", "bfloat16", "cuda", "auto")
    need32 = plan_load(small_ckpt, dtype="float32", load="nf4").need
    _budget(monkeypatch, ram=0, gpus=[math.ceil(need32["nf4"] / 0.9) + 8])
    p = plan_load(small_ckpt, dtype="float32")
    assert need32["nf4"] <= p.budget < need32["full"]
    assert (p.mode, p.device) == ("nf4", "cuda")
    with pytest.raises(GraftError, match=r"load = 'x'.*Fix: use one of auto, full, nf4"):
        plan_load(small_ckpt, load="x")


def test_bad_load_settings_fail_when_the_config_is_built():
    from analysis.report import ReportConfig
    from common.errors import GraftError
    from workflows.evaluate import EvalConfig

    with pytest.raises(GraftError, match=r"`load` \(--load\) = 'nf5' is not one of auto, full, nf4"):
        EvalConfig(models=["m"], labels=["m"], dev=["d"], out="o", load="nf5")
    with pytest.raises(GraftError, match=r"`dtype` \(--dtype\) = 'bf16' is not one of auto, float32, bfloat16, float16"):
        ReportConfig(out="o", dtype="bf16")


def test_eval_stage_loads_nf4_when_full_precision_does_not_fit(small_ckpt, tmp_path, monkeypatch, news_lines):
    """With less RAM than the fp32 model needs (x2), the eval stage never builds the fp32 model: NF4 instead."""
    import bitsandbytes as bnb
    import transformers

    import continual.model as M
    from common.io import read_manifest
    from demo import sources
    from tiny_continual import make_tokenizer
    from continual.load import plan_load
    from workflows.evaluate import EvalConfig, evaluate_models

    make_tokenizer(small_ckpt)
    _budget(monkeypatch, ram=2 * plan_load(small_ckpt, load="nf4").need["nf4"] + 2)  # nf4 fits, fp32 does not
    loaded = []
    real = M.load_base_4bit

    def spy(*a, **kw):
        m = real(*a, **kw)
        loaded.append(sum(isinstance(x, bnb.nn.Linear4bit) for x in m.modules()))
        return m

    real_load = transformers.AutoModelForCausalLM.from_pretrained

    def only_quantized(*a, **kw):
        assert "quantization_config" in kw, "full-precision from_pretrained called"
        return real_load(*a, **kw)

    monkeypatch.setattr(M, "load_base_4bit", spy)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", only_quantized)
    dev = sources.write_jsonl(tmp_path / "zh.jsonl", list(news_lines[:3]))
    out = evaluate_models(EvalConfig(models=[str(small_ckpt)], labels=["m"], dev=[str(dev)], out=str(tmp_path / "e"),
                                     max_len=64))
    res = read_manifest(out)["results"]["m"]
    assert loaded and loaded[0] > 0 and res["load"]["mode"] == "nf4" and math.isfinite(res["zh"]["bpb"])

    from analysis.report import ReportConfig, write_report

    md = (write_report(ReportConfig(out=str(tmp_path / "r"), eval=str(out))) / "report.md").read_text()
    assert "Loaded as: m: NF4 4-bit (compute float32) on cpu." in md and "hold it: BOS, text, EOS." in md
    assert "| m | 32,000 | " in md and md.count(" bpb |") == 1  # one dev set: the load record is not a column


def _fake_merged(folder):
    from common.io import write_manifest

    write_manifest(folder, stage="continual.merge", config={})
    return folder


def test_report_skips_the_sample_when_the_merged_model_does_not_fit(small_ckpt, tmp_path, monkeypatch):
    import transformers

    from analysis.report import ReportConfig, write_report

    merged = _fake_merged(small_ckpt)
    _budget(monkeypatch, ram=1000)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **kw: (_ for _ in ()).throw(AssertionError("model loaded")))
    out = write_report(ReportConfig(out=str(tmp_path / "r"), merged=str(merged)))
    md = (out / "report.md").read_text()
    assert "**Sample skipped**" in md and "does not fit this machine" in md and "no GPU" in md
    assert "generated sample skipped" in md  # in the summary too
    out = write_report(ReportConfig(out=str(tmp_path / "r2"), merged=str(merged), generate=False))
    assert "`generate = false`" in (out / "report.md").read_text()


def test_report_generates_with_the_planned_load(small_ckpt, tmp_path, monkeypatch):
    from analysis.report import ReportConfig, write_report
    from common.io import read_manifest
    from tiny_continual import make_tokenizer

    make_tokenizer(small_ckpt)
    merged = _fake_merged(small_ckpt)
    _budget(monkeypatch, ram=10 * 2**30)
    out = write_report(ReportConfig(out=str(tmp_path / "r"), merged=str(merged), prompts=["中国"], max_new_tokens=4,
                                    load="nf4"))
    m = read_manifest(out)["merged"]
    assert m["load"]["mode"] == "nf4" and m["samples"][0]["new_tokens"] == 4
    assert "Loaded as NF4 4-bit (compute float32) on cpu" in (out / "report.md").read_text()
