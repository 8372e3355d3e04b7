"""Every architecture of continual/arch.py's table end to end on a tiny model built from its config:
embed init (new rows recomputed here) -> graft train with target_modules = auto on a real NF4 base (loss falls,
the right Linears are 4-bit and get LoRA, resume is bit-exact) -> graft merge (equals peft's merge) -> eval.
Mixtral runs the same stages in test_continual_train.py, test_continual_merge.py and test_embed_init.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

from common.errors import GraftError
from continual import arch as A
from continual import data as D
from continual.metrics import read_metrics
from tiny_continual import tiny_train_config, tiny_workspace, train_killed_at
from continual.train import train

E2E = ["qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "llama", "mistral"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.getbasetemp() / "continual_ws")


def _vocab(ws) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(ws["tok"])))


def _linears(model_dir):
    """{module path: (in, out)} of every nn.Linear of the full-precision model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _expected_sources(base_model_path, tok_dir) -> list[list[int]]:
    """Old ids of each added token's text, by HF `tokenizers` BPE on the SentencePiece model without the dummy
    prefix (another encoder than embed init's)."""
    from transformers import AutoTokenizer

    from common.tokenizer_files import load_model_proto, sentencepiece_to_fast

    proto = load_model_proto(base_model_path)
    proto.normalizer_spec.add_dummy_prefix = False
    fast = sentencepiece_to_fast(proto)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    return [fast.encode(tok.convert_ids_to_tokens(i), add_special_tokens=False).ids for i in range(32000, len(tok))]


@pytest.mark.slow
@pytest.mark.parametrize("model_type", E2E)
def test_embed_train_resume_merge_eval(model_type, ws, tmp_path, base_model_path, news_lines):
    from demo.tiny import save_tiny_model
    from continual.config import MergeConfig
    from continual.merge import merge_adapter
    from embed_init.config import EmbedInitConfig
    from embed_init.grow import grow_embeddings

    # ---- embed init: 32,000 rows -> the workspace tokenizer's; every new row is the mean of its pieces' old rows
    src = save_tiny_model(tmp_path / "src", model_type)
    base = grow_embeddings(EmbedInitConfig(model=str(src), old_tokenizer=str(base_model_path),
                                           new_tokenizer=str(ws["tok"]), out=str(tmp_path / "base"), progress=False))
    from common.checkpoint import open_checkpoint

    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        a, b = open_checkpoint(src).read_tensor(name), open_checkpoint(base).read_tensor(name)
        assert b.shape == (_vocab(ws), a.shape[1]) and torch.equal(b[:32000], a)
        for k, ids in enumerate(_expected_sources(base_model_path, ws["tok"])):
            torch.testing.assert_close(b[32000 + k], a[ids].mean(0), rtol=1e-6, atol=1e-7)

    # ---- train, target_modules = auto: loss falls; routers/gates and lm_head stay 16-bit, every other Linear
    # is 4-bit and gets LoRA
    arch = A.ARCHS[model_type]
    kw = dict(model=str(base), max_steps=4, save_every=2, eval_every=2, keep_checkpoints=1, eval_blocks=4,
              learning_rate=5e-2, embedding_lr=5e-2, min_lr_ratio=1.0)
    whole = train(tiny_train_config(ws, tmp_path / "whole", **kw))
    dev = [r["dev_loss"] for r in read_metrics(whole) if r["dev_loss"] is not None]
    assert len(dev) == 3 and dev[-1] < dev[0] - 0.3, dev
    rows = [r for r in read_metrics(whole) if r["loss"] is not None]
    assert all((r["aux_loss"] is not None and r["aux_loss"] > 0) == arch.aux_loss for r in rows)
    new = _linears(base)
    frozen16 = {n for n in new if n.rsplit(".", 1)[-1] in (*arch.skip_4bit, "lm_head")}
    m = json.loads((whole / "manifest.json").read_text())
    assert m["counts"]["params_4bit"] == sum(i * o for n, (i, o) in new.items() if n not in frozen16)
    if model_type == "qwen2_moe":  # the one-output shared_expert_gate next to the router stays 16-bit
        assert any(n.endswith("shared_expert_gate") for n in frozen16)
    from safetensors import safe_open

    with safe_open(str(whole / "adapter" / "adapter_model.safetensors"), "pt") as f:
        lora = {k.split(".lora_A")[0].removeprefix("base_model.model.") for k in f.keys() if ".lora_A" in k}
    assert lora == set(new) - frozen16 and lora  # attention + every expert / shared expert / MLP Linear

    # ---- resume: killed during step 4 (after the step-2 checkpoint), re-run: the same curve and adapter, bit for bit
    train_killed_at(tiny_train_config(ws, tmp_path / "resumed", **kw), 3)
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-000002"]
    resumed = train(tiny_train_config(ws, tmp_path / "resumed", **kw))
    keys = ("step", "lr", "loss", "aux_loss", "grad_norm", "dev_loss")
    assert [{k: r[k] for k in keys} for r in read_metrics(whole)] == [{k: r[k] for k in keys}
                                                                      for r in read_metrics(resumed)]
    from safetensors.torch import load_file

    wa, wb = (load_file(str(p / "adapter" / "adapter_model.safetensors")) for p in (whole, resumed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # ---- merge equals peft's merge_and_unload
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = merge_adapter(MergeConfig(base=str(base), adapter=str(whole / "adapter"), out=str(tmp_path / "m")))
    ids = torch.tensor(D.load_split(ws["data"], "dev")[:2]["input_ids"], dtype=torch.long)
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)(ids).logits
        ref_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        before = ref_model(ids).logits
        ref = PeftModel.from_pretrained(ref_model, str(whole / "adapter")).merge_and_unload()(ids).logits
    assert (ours - ref).abs().max().item() <= 1e-5 and (ours - before).abs().max().item() > 1e-2

    # ---- eval (NF4 load, the architecture's skips): the trained model scores better on held-out news
    from demo import sources
    from common.io import read_manifest
    from workflows.evaluate import EvalConfig, evaluate_models

    dev_file = sources.write_jsonl(tmp_path / "zh.jsonl", list(news_lines[:8:2]))
    res = read_manifest(evaluate_models(EvalConfig(
        models=[str(base), str(merged)], labels=["base", "merged"], dev=[str(dev_file)], out=str(tmp_path / "e"),
        max_len=64, load="nf4")))["results"]
    assert res["merged"]["load"]["mode"] == "nf4" and res["merged"]["zh"]["bpb"] < res["base"]["zh"]["bpb"]


def test_table_fits_each_architecture_and_its_4bit_split(tmp_path):
    """For every row of the table (DeepSeek-V2 and Mixtral too): auto targets = every Linear but the routers and
    lm_head; the quantization config turns exactly those into Linear4bit; the aux-loss flag matches the config."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from demo.tiny import save_tiny_model, tiny_config
    from continual import model as M

    for model_type, arch in A.ARCHS.items():
        d = save_tiny_model(tmp_path / model_type, model_type, vocab_size=256)
        cfg = tiny_config(model_type, vocab_size=256)
        targets = M.lora_targets(d, ["auto"])
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(cfg)
        leaf = {n: n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert set(targets) == set(leaf.values()) - {*arch.skip_4bit, "lm_head"}, model_type
        qc = M.quantization_config(torch.float32, skip=A.skip_modules(cfg.to_dict()))
        model = replace_with_bnb_linear(model, modules_to_not_convert=qc.llm_int8_skip_modules, quantization_config=qc)
        kinds = {n: type(m) for n, m in model.named_modules() if n in leaf}
        assert {n for n, k in kinds.items() if k is bnb.nn.Linear4bit} == {n for n, s in leaf.items() if s in targets}
        assert A.has_aux_loss(cfg) == arch.aux_loss, model_type


def test_unknown_architecture_and_targets_that_match_nothing(ws, tmp_path):
    """GraniteMoE (in transformers, not in the table; experts in 3-D tensors, router `router.layer`): auto is an
    error listing its linear layers; Mixtral's names on a dense Llama: an error, never an empty run."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from demo.tiny import save_tiny_model

    d = tmp_path / "granite"
    cfg = AutoConfig.for_model("granitemoe", vocab_size=_vocab(ws), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    with pytest.raises(GraftError, match=r"granite: model_type 'granitemoe' is not in graft's architecture table .*"
                                         r"its linear layers are: k_proj, layer, lm_head, o_proj, q_proj, v_proj.*"
                                         r"Fix: set target_modules"):
        train(tiny_train_config(ws, tmp_path / "o", model=str(d), tokenizer=str(ws["tok"])))
    d = save_tiny_model(tmp_path / "llama", "llama", vocab_size=_vocab(ws))
    with pytest.raises(GraftError, match=r"target_modules names 'w1', 'w2', 'w3', which the model does not have"):
        train(tiny_train_config(ws, tmp_path / "o2", model=str(d), tokenizer=str(ws["tok"]),
                                target_modules=["q_proj", "w1", "w2", "w3"]))


def test_unknown_moe_with_explicit_targets_keeps_its_router_out_of_4bit(ws, tmp_path):
    """GraniteMoE's router is a Linear named `layer` (hidden -> one logit per expert), a name the table does not
    know: its shape gives it away, so it stays 16-bit (and frozen) while the named attention targets train."""
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM

    import continual.model as M
    from continual.model import read_model_config

    d = tmp_path / "granite"
    cfg = AutoConfig.for_model("granitemoe", vocab_size=_vocab(ws), hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    shapes = A.checkpoint_shapes(d)
    assert A.router_names(read_model_config(d), shapes) == ["layer"]
    # as many experts as hidden_size: q_proj and o_proj would have a router's shape, so nothing is guessed
    assert A.router_names({**read_model_config(d), "num_local_experts": 32}, shapes) == []
    assert A.router_names({**read_model_config(d), "num_local_experts": 8}, shapes) == []  # no weight has 8 rows
    # 16 experts = the key/value width (2 heads x 8): k_proj and v_proj have a router's shape, but are projections
    wide = {k: (16, 32) if ".router.layer." in k else v for k, v in shapes.items()}
    assert {s for k, s in wide.items() if k.endswith((".k_proj.weight", ".v_proj.weight"))} == {(16, 32)}
    assert A.router_names({**read_model_config(d), "num_local_experts": 16}, wide) == ["layer"]
    model = M.load_base_4bit(d, torch.float32)
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit))}
    routers = {n for n in kinds if n.endswith(".router.layer")}
    assert len(routers) == 2 and all(kinds[n] is torch.nn.Linear for n in routers)
    assert {n.rsplit(".", 1)[-1] for n, k in kinds.items() if k is bnb.nn.Linear4bit} == {"q_proj", "k_proj",
                                                                                           "v_proj", "o_proj"}
    out = train(tiny_train_config(ws, tmp_path / "o", model=str(d), tokenizer=str(ws["tok"]), max_steps=2,
                                  eval_every=0, save_every=0, target_modules=["q_proj", "v_proj"]))
    rows = [r for r in read_metrics(out) if r["loss"] is not None]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
