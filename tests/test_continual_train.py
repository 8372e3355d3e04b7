"""graft train on a tiny Mixtral with real NF4 4-bit weights (bitsandbytes on CPU) and real text."""
from __future__ import annotations

import json
import pytest
import torch

from common.errors import GraftError
from continual import data as D
from continual import model as M
from continual.config import TrainConfig, config_from_dict, load_train_config
from continual.metrics import read_metrics
from tiny_continual import make_blocks, tiny_train_config, tiny_workspace
from continual.train import train


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.getbasetemp() / "continual_ws")


def test_loss_falls_over_20_steps_with_4bit_experts(ws, tmp_path):
    out = train(tiny_train_config(ws, tmp_path / "run", max_steps=20, eval_every=10, save_every=10))
    rows = [r for r in read_metrics(out) if r["loss"] is not None]
    assert [r["step"] for r in rows] == list(range(1, 21))
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.3, (first, last)
    dev = [r for r in read_metrics(out) if r["dev_loss"] is not None]
    assert [r["step"] for r in dev] == [0, 10, 20]
    assert dev[-1]["dev_loss"] < dev[0]["dev_loss"] - 0.3
    # bits per byte = nats / ln2 / bytes, consistent with the logged loss and the manifest's byte count
    m = json.loads((out / "manifest.json").read_text())
    n_tokens = 8 * 31  # 8 dev blocks of 32 tokens, 31 predicted each
    assert dev[-1]["dev_bpb"] == pytest.approx(dev[-1]["dev_loss"] * n_tokens / 0.6931471805599453
                                               / m["counts"]["dev_bytes"], rel=1e-9)
    # all attention and expert weights were 4-bit, router and embeddings not
    assert m["counts"]["params_4bit"] == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 4 * 3 * 64 * 128)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "tokenizer.json").is_file()
    assert any((out / "tb").iterdir())
    # the router auxiliary loss was on (Mixtral leaves output_router_logits off by default)
    assert all(r["aux_loss"] is not None and r["aux_loss"] > 0 for r in rows)


def test_resume_gives_the_same_loss_curve(ws, tmp_path, monkeypatch):
    cfg = dict(max_steps=4, save_every=2, eval_every=2, grad_accum=2, keep_checkpoints=1)
    whole = train(tiny_train_config(ws, tmp_path / "whole", **cfg))

    real = D.micro_batches

    def dies_after(*a, **kw):  # kill the run during step 4 (after the step-2 checkpoint)
        for k, item in enumerate(real(*a, **kw)):
            if k == 7:
                raise RuntimeError("killed")
            yield item

    monkeypatch.setattr(D, "micro_batches", dies_after)
    with pytest.raises(RuntimeError, match="killed"):
        train(tiny_train_config(ws, tmp_path / "resumed", **cfg))
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-000002"]
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")][-1] == 3  # step 3 was logged, then killed
    monkeypatch.setattr(D, "micro_batches", real)
    resumed = train(tiny_train_config(ws, tmp_path / "resumed", **cfg))

    keys = ("step", "tokens", "lr", "embedding_lr", "loss", "aux_loss", "grad_norm", "dev_loss", "dev_bpb")
    a = [{k: r[k] for k in keys} for r in read_metrics(whole)]
    b = [{k: r[k] for k in keys} for r in read_metrics(resumed)]
    assert a == b  # bit-identical curve, incl. dropout and data order after the restart
    from safetensors.torch import load_file

    wa, wb = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (whole, resumed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_new_rows_mode_trains_only_added_rows(ws, tmp_path):
    from safetensors import safe_open

    out = train(tiny_train_config(ws, tmp_path / "rows", embeddings="new-rows", max_steps=4, save_every=0,
                                  eval_every=0))
    info = json.loads((out / "adapter" / "graft_adapter.json").read_text())
    assert info["new_rows_start"] == 32000  # read from the base's manifest (old_vocab_size)
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        emb = {k: f.get_tensor(k) for k in f.keys() if "lora_" not in k}
    vocab = json.loads((ws["base"] / "config.json").read_text())["vocab_size"]
    # only the added rows are stored (no full matrix copies), for both matrices
    assert sorted(emb) == ["base_model.model.lm_head.token_adapter.trainable_tokens_delta",
                           "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert all(t.shape == (vocab - 32000, 64) for t in emb.values())

    from continual.config import MergeConfig
    from continual.merge import merge_adapter
    from transformers import AutoModelForCausalLM

    merged = merge_adapter(MergeConfig(base=str(ws["base"]), adapter=str(out / "adapter"), out=str(tmp_path / "m")))
    a = AutoModelForCausalLM.from_pretrained(str(ws["base"]), dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    for get in (lambda m: m.model.embed_tokens.weight, lambda m: m.lm_head.weight):
        wa, wb = get(a), get(b)
        assert torch.equal(wa[:32000], wb[:32000])  # old rows untouched
        changed = (wa[32000:] != wb[32000:]).any(dim=1)
        assert changed.any()
    assert (a.lm_head.weight[32000:] != b.lm_head.weight[32000:]).any(dim=1).all()  # every output row gets gradient


# The broken control path (fix=False) backprops through the repacked gemv_4bit kernel, which has no autograd
# formula: torch warns, and that is the mechanism of the trap.
@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered")
def test_eval_then_train_gradients_match_fresh_model(ws):
    """The bitsandbytes CPU trap: a no-grad eval forward must not change later training."""
    from bitsandbytes.functional import has_avx512bf16

    cfg = TrainConfig(model=str(ws["base"]), train_data="x", out="x", lora_r=8, lora_alpha=16, lora_dropout=0.0)
    batch = torch.tensor(D.load_split(ws["data"], "train")[:2]["input_ids"], dtype=torch.long)
    vocab = json.loads((ws["base"] / "config.json").read_text())["vocab_size"]

    def grads(eval_first: bool, fix: bool = True):
        torch.manual_seed(0)
        model = M.load_base_4bit(ws["base"], torch.float32)
        model = M.add_adapters(model, cfg, vocab, None)
        if not fix:
            for m in model.modules():
                if hasattr(m, "support_avx512bf16_for_cpu"):
                    m.support_avx512bf16_for_cpu = True
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=batch)
            model.train()
        model(input_ids=batch, labels=batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh, after_eval = grads(False), grads(True)
    assert fresh.keys() == after_eval.keys() and len(fresh) > 0
    assert all(torch.equal(fresh[k], after_eval[k]) for k in fresh)
    if has_avx512bf16():  # on this CPU, show the trap is real without the fix
        broken = grads(True, fix=False)
        assert any(not torch.allclose(fresh[k], broken[k]) for k in fresh)


def test_toml_config_and_unknown_key(tmp_path):
    p = tmp_path / "train.toml"
    p.write_text('model = "m"\ntrain_data = "d"\nout = "o"\nlora_r = 16\ntarget_modules = ["q_proj", "w1"]\n'
                 'learning_rate = 1\n')
    cfg = load_train_config(p, lora_alpha=32)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.target_modules, cfg.learning_rate) == (16, 32, ["q_proj", "w1"], 1.0)
    assert cfg.lora_dropout == 0.05 and cfg.embeddings == "full" and cfg.router_aux_loss
    p.write_text('model = "m"\nlora_rank = 16\n')
    with pytest.raises(GraftError, match=r"train\.toml: unknown key `lora_rank`.*did you mean `lora_r`"):
        load_train_config(p)
    with pytest.raises(GraftError, match=r"train\.toml: `lora_r` must be int \(got .big.\)"):
        config_from_dict(TrainConfig, {"lora_r": "big"}, p)
    # the same checks as a workflow file's (common/config.py): a comma string is a list, a bool is not an int
    assert config_from_dict(TrainConfig, {"target_modules": "q_proj, v_proj"}, p).target_modules == ["q_proj", "v_proj"]
    with pytest.raises(GraftError, match=r"`lora_r` must be int \(got True\)"):
        config_from_dict(TrainConfig, {"lora_r": True}, p)


def test_cli_flags_override_toml(tmp_path):
    from workflows.cli import build_parser
    from continual.cli import _make_train

    p = tmp_path / "train.toml"
    p.write_text('model = "m"\ntrain_data = "d"\nout = "o"\ngradient_checkpointing = false\nlora_r = 4\n')
    ns = build_parser().parse_args(["train", "--config", str(p), "--lora-r", "8"])
    cfg, _ = _make_train(ns)
    assert cfg.lora_r == 8 and cfg.gradient_checkpointing is False and cfg.model == "m"


# ---- bad input: each gets a clear error naming the file and the fix ----

def test_tokenizer_size_mismatch(ws, tmp_path):
    from demo.tiny import save_tiny_mixtral

    base = save_tiny_mixtral(tmp_path / "base32000", vocab_size=32000)  # the base before `graft embed init`
    with pytest.raises(GraftError, match=r"tok: the tokenizer has 320\d\d tokens but the model .* has 32000 "
                                         r"embedding rows.*graft embed init"):
        train(tiny_train_config(ws, tmp_path / "o", model=str(base), tokenizer=str(ws["tok"])))


def test_blocks_of_another_length(ws, tmp_path):
    data = make_blocks(tmp_path / "data", ws["tok"], block_len=32, n_train=8, n_dev=2, dev_block_len=16)
    with pytest.raises(GraftError, match=r"dev.*blocks are 16 tokens long, expected 32"):
        train(tiny_train_config(ws, tmp_path / "o", train_data=str(data)))
    with pytest.raises(GraftError, match=r"blocks are 32 tokens long, expected 64.*seq_len = 32"):
        train(tiny_train_config(ws, tmp_path / "o", seq_len=64))


def test_target_module_the_model_lacks(ws, tmp_path):
    with pytest.raises(GraftError, match=r"target_modules names 'gate_proj', which the model does not have.*w1"):
        train(tiny_train_config(ws, tmp_path / "o", target_modules=["q_proj", "gate_proj"]))


def test_resume_refuses_other_settings_and_corrupt_checkpoints(ws, tmp_path, monkeypatch):
    real = D.micro_batches

    def dies(*a, **kw):
        for k, item in enumerate(real(*a, **kw)):
            if k == 3:
                raise RuntimeError("killed")
            yield item

    monkeypatch.setattr(D, "micro_batches", dies)
    with pytest.raises(RuntimeError):
        train(tiny_train_config(ws, tmp_path / "o", save_every=2, eval_every=0))
    monkeypatch.setattr(D, "micro_batches", real)
    assert not (tmp_path / "o" / "manifest.json").exists()
    # resuming with settings that change the curve is refused rather than silently mixing runs
    with pytest.raises(GraftError, match=r"other settings \(learning_rate differ\)"):
        train(tiny_train_config(ws, tmp_path / "o", save_every=2, eval_every=0, learning_rate=1e-3))
    # a longer or shorter run would rebuild the cosine schedule with another length: the LR would jump
    with pytest.raises(GraftError, match=r"o/train_config\.json: the run was started with max_steps = 8, which fixes "
                                         r"the length of its cosine learning-rate schedule; resuming with max_steps = "
                                         r"12 would make the learning rate jump\. Fix: resume with max_steps = 8"):
        train(tiny_train_config(ws, tmp_path / "o", save_every=2, eval_every=0, max_steps=12))
    with pytest.raises(GraftError, match=r"checkpoints of a run.*resume = true"):
        train(tiny_train_config(ws, tmp_path / "o", save_every=2, eval_every=0, resume=False))
    opt = tmp_path / "o" / "checkpoints" / "step-000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:-100])
    with pytest.raises(GraftError, match=r"optimizer\.pt: checksum mismatch: the checkpoint is corrupt.*delete"):
        train(tiny_train_config(ws, tmp_path / "o", save_every=2, eval_every=0))


def test_most_parameters_of_a_full_width_mixtral_layer_are_4bit():
    """Full-width one-layer Mixtral-8x7B (hidden 4096, intermediate 14336, 8 experts, 32k vocab), built on the
    meta device and converted with our quantization config: which modules become Linear4bit, and their share."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from demo.tiny import tiny_mixtral_config

    cfg = tiny_mixtral_config(vocab_size=32000, hidden=4096, layers=1, experts=8, intermediate=14336, heads=32,
                              kv_heads=8)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    qc = M.quantization_config(torch.bfloat16)
    model = replace_with_bnb_linear(model, modules_to_not_convert=qc.llm_int8_skip_modules, quantization_config=qc)
    kinds = {n.rsplit(".", 1)[-1]: type(m) for n, m in model.named_modules()}
    assert kinds["w1"] is bnb.nn.Linear4bit and kinds["w2"] is bnb.nn.Linear4bit and kinds["q_proj"] is bnb.nn.Linear4bit
    assert kinds["gate"] is torch.nn.Linear and kinds["lm_head"] is torch.nn.Linear
    q = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    total = 2 * 32000 * 4096 + 4096 * (4096 * 2 + 1024 * 2) + 8 * 3 * 4096 * 14336 + 8 * 4096 + 3 * 4096
    assert q == 4096 * (4096 * 2 + 1024 * 2) + 8 * 3 * 4096 * 14336
    assert q / total >= 0.80, q / total  # 84.7%


def test_trains_on_a_corpus_prepare_folder(ws, tmp_path):
    """The real interface between the stages: blocks written by `graft corpus prepare`, read via load_blocks."""
    from demo import sources
    from corpus.blocks import load_blocks
    from corpus.prepare import PrepareConfig, prepare

    src = sources.write_jsonl(tmp_path / "mixed.jsonl", list(sources.people_daily_lines()[:300])
                              + list(sources.english_paragraphs()[:100]))
    corpus = prepare(PrepareConfig(name="mixed", tokenizer=str(ws["tok"]), out=str(tmp_path / "corpus"),
                                   block_size=32, files=[str(src)], split="4:1", progress=False))
    out = train(tiny_train_config(ws, tmp_path / "run", train_data=str(corpus), max_steps=2, save_every=0,
                                  eval_every=0, eval_blocks=4))
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["train_blocks"] == len(load_blocks(corpus, "train")) > 0
    assert m["counts"]["dev_blocks"] == 4 and m["final_dev"]["dev_bpb"] > 0


def test_two_process_ddp_matches_one_process_with_grad_accum(ws, tmp_path):
    """torchrun with 2 CPU processes (gloo): each step sees the same blocks as one process with grad_accum 2,
    so without dropout the loss curves agree (up to float summation order)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    common = dict(max_steps=3, eval_every=0, save_every=2, lora_dropout=0.0)
    single = train(tiny_train_config(ws, tmp_path / "one", grad_accum=2, **common))
    toml = tmp_path / "ddp.toml"
    cfg = tiny_train_config(ws, tmp_path / "two", **common)
    import tomli_w

    toml.write_text(tomli_w.dumps({k: v for k, v in cfg.__dict__.items() if v is not None}))
    torchrun = Path(sys.executable).parent / "torchrun"
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "workflows.cli", "train",
                          "--config", str(toml)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("done: adapter in") == 1
    a, b = read_metrics(single), read_metrics(tmp_path / "two")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b] == [128, 256, 384]
    for ra, rb in zip(a, b):
        for k in ("loss", "dev_loss", "lr"):
            assert (ra[k] is None and rb[k] is None) or ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (k, ra, rb)
    ck = tmp_path / "two" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in ck.glob("rng-rank*.pt")) == ["rng-rank0.pt", "rng-rank1.pt"]


def test_sharded_checkpoint_round_trip(tmp_path):
    """DeepSpeed/FSDP layout: per-process trainable weights and optimizer state; resume needs the same world."""
    from continual.state import checkpoint_dirs, load_checkpoint, save_checkpoint

    def make():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        m[0].weight.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1)
        sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
        return m, opt, sch

    m, opt, sch = make()
    m(torch.ones(3, 4)).sum().backward()
    opt.step()
    sch.step()
    ck = save_checkpoint(tmp_path, 7, m, opt, sch, {"micro_pos": 7, "tokens": 70}, keep=2, sharded=True)
    assert sorted(p.name for p in ck.iterdir()) == ["checksums.json", "optimizer-rank0.pt", "rng-rank0.pt",
                                                    "scheduler.pt", "state.json", "trainable-rank0.safetensors"]
    assert checkpoint_dirs(tmp_path) == [ck]
    m2, opt2, sch2 = make()
    state = load_checkpoint(ck, m2, opt2, sch2)
    assert state["micro_pos"] == 7 and state["sharded"]
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert sch2.last_epoch == 1
    with pytest.raises(GraftError, match="written by 1 processes, this run has 2"):
        load_checkpoint(ck, m2, opt2, sch2, rank=0, world=2)


def test_bf16_compute_keeps_trainable_weights_in_fp32(ws, tmp_path):
    """The GPU setting (bf16 compute under autocast) also runs on CPU; adapters stay fp32 for AdamW."""
    import math

    from safetensors import safe_open

    out = train(tiny_train_config(ws, tmp_path / "bf16", compute_dtype="bfloat16", embeddings="new-rows",
                                  max_steps=2, eval_every=0, save_every=0))
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out) if r["loss"] is not None)
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
