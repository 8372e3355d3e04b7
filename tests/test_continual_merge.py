"""graft merge: shard-by-shard LoRA + embedding merge, checked against peft's merge_and_unload."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from common.errors import GraftError
from continual.config import MergeConfig
from continual.merge import merge_adapter
from tiny_continual import make_tiny_base, tiny_train_config, tiny_workspace
from continual.train import train


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tiny_workspace(tmp_path_factory.getbasetemp() / "continual_ws")


@pytest.fixture(scope="module")
def full_adapter(ws, tmp_path_factory):
    out = train(tiny_train_config(ws, tmp_path_factory.mktemp("full") / "run", max_steps=3, eval_every=0,
                                  save_every=0, lora_dropout=0.0))
    return out / "adapter"


def _logits(path, ids, adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    with torch.no_grad():
        return model(ids).logits


def _ids(ws):
    from continual.data import load_split

    return torch.tensor(load_split(ws["data"], "dev")[:2]["input_ids"], dtype=torch.long)


def test_merge_equals_peft_merge_and_unload(ws, full_adapter, tmp_path):
    out = merge_adapter(MergeConfig(base=str(ws["base"]), adapter=str(full_adapter), out=str(tmp_path / "m")))
    ids = _ids(ws)
    ours, ref, base = _logits(out, ids), _logits(ws["base"], ids, full_adapter), _logits(ws["base"], ids)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours - base).abs().max().item() > 1e-2  # the adapter did change the model
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["lora_merged"] == 2 * (4 + 4 * 3) and m["counts"]["replaced"] == 2
    # the tokenizer travels with the merged model, and it loads offline
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(str(out))) == json.loads((out / "config.json").read_text())["vocab_size"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(json.loads((ws["base"] / "model.safetensors.index.json").read_text())
                                           ["weight_map"])


def test_merge_to_bf16(ws, full_adapter, tmp_path):
    from safetensors import safe_open

    out = merge_adapter(MergeConfig(base=str(ws["base"]), adapter=str(full_adapter), out=str(tmp_path / "m"),
                                    dtype="bf16"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for shard in set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()):
        with safe_open(str(out / shard), "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    ids = _ids(ws)
    ref = _logits(ws["base"], ids, full_adapter)
    assert (_logits(out, ids) - ref).abs().max().item() < 0.1  # bf16 rounding only


def _plain_peft_copy(adapter, dest):
    """The adapter without graft's record, as a plain peft folder: checked tensor by tensor."""
    shutil.copytree(adapter, dest)
    (dest / "graft_adapter.json").unlink()
    return dest


def test_adapter_for_another_vocabulary(ws, full_adapter, tmp_path):
    rows = json.loads((full_adapter / "graft_adapter.json").read_text())["vocab_size"]
    # a base with the original 32,000-row vocabulary (the adapter was trained on the grown one)
    from demo.tiny import save_tiny_mixtral

    small = save_tiny_mixtral(tmp_path / "small", vocab_size=32000)
    with pytest.raises(GraftError, match=rf"trained for a vocabulary of {rows} rows, the base .* has 32000"):
        merge_adapter(MergeConfig(base=str(small), adapter=str(full_adapter), out=str(tmp_path / "m")))
    # an adapter without graft's record (plain peft folder) is still checked tensor by tensor
    plain = _plain_peft_copy(full_adapter, tmp_path / "plain")
    with pytest.raises(GraftError, match=rf"(lm_head|embed_tokens).weight is \[{rows}, 64\] but the base.s is "
                                         r"\[32000, 64\]: it was trained for a vocabulary"):
        merge_adapter(MergeConfig(base=str(small), adapter=str(plain), out=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


def test_adapter_for_another_base(ws, full_adapter, tmp_path):
    other = make_tiny_base(tmp_path / "other", ws["tok"], seed=1)  # same shapes, other weights
    with pytest.raises(GraftError, match=r"trained on another base \(weights differ"):
        merge_adapter(MergeConfig(base=str(other), adapter=str(full_adapter), out=str(tmp_path / "m")))
    wider = make_tiny_base(tmp_path / "wider", ws["tok"], hidden=128)
    with pytest.raises(GraftError, match=r"another base \(configuration differ"):
        merge_adapter(MergeConfig(base=str(wider), adapter=str(full_adapter), out=str(tmp_path / "m")))
    plain = _plain_peft_copy(full_adapter, tmp_path / "plain")
    with pytest.raises(GraftError, match=r"LoRA of .* but the base weight is .*trained for another base"):
        merge_adapter(MergeConfig(base=str(wider), adapter=str(plain), out=str(tmp_path / "m")))
    assert not (tmp_path / "m").exists()


def test_corrupt_adapter_and_base(ws, full_adapter, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(full_adapter, bad)
    w = bad / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    with pytest.raises(GraftError, match=r"adapter_model\.safetensors: corrupt shard.*truncated"):
        merge_adapter(MergeConfig(base=str(ws["base"]), adapter=str(bad), out=str(tmp_path / "m")))
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(GraftError, match=r"adapter_config\.json:1: not valid JSON"):
        merge_adapter(MergeConfig(base=str(ws["base"]), adapter=str(bad), out=str(tmp_path / "m")))
    base = tmp_path / "base"
    shutil.copytree(ws["base"], base)
    shard = sorted(base.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(GraftError, match=r"corrupt shard"):
        merge_adapter(MergeConfig(base=str(base), adapter=str(full_adapter), out=str(tmp_path / "m"),
                                  allow_other_base=True))
    assert not (tmp_path / "m").exists()


def _peft_adapter(base, dest, **lora):
    """A plain peft adapter on the full-precision `base`, saved as `graft train` saves one, with every trained
    tensor random (LoRA B included, trainable-token rows too) so that each scale and row shows in the merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(init_lora_weights=False, task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(dest), save_embedding_layers=False)
    return dest


def test_rslora_rank_and_alpha_patterns_merge_like_peft(ws, tmp_path):
    adapter = _peft_adapter(ws["base"], tmp_path / "a", r=8, lora_alpha=16, use_rslora=True,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "w1"],
                            rank_pattern={"q_proj": 4, "w1": 2}, alpha_pattern={"v_proj": 48, "w1": 3})
    acfg = json.loads((adapter / "adapter_config.json").read_text())
    assert acfg["use_rslora"] and acfg["rank_pattern"] and acfg["alpha_pattern"]
    out = merge_adapter(MergeConfig(base=str(ws["base"]), adapter=str(adapter), out=str(tmp_path / "m")))
    ids = _ids(ws)
    ours, ref, base = _logits(out, ids), _logits(ws["base"], ids, adapter), _logits(ws["base"], ids)
    assert (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert (ours - base).abs().max().item() > 1e-2
    # the scale of one module, tensor by tensor: alpha 48 over sqrt(r 8) for v_proj (rsLoRA + alpha_pattern),
    # and r 2 from rank_pattern for the experts' w1
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(ws["base"]), dtype=torch.float32),
                                       str(adapter)).merge_and_unload().state_dict()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("model.layers.0.self_attn.v_proj.weight", "model.layers.1.block_sparse_moe.experts.3.w1.weight",
                 "model.layers.0.self_attn.q_proj.weight"):
        with safe_open(str(out / index[name]), "pt") as f:
            assert torch.allclose(f.get_tensor(name), merged[name], atol=1e-6), name
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert f.get_tensor("base_model.model.model.layers.1.block_sparse_moe.experts.3.w1.lora_A.weight").shape[0] == 2


def test_new_rows_merge_like_peft(ws, tmp_path):
    vocab = json.loads((ws["base"] / "config.json").read_text())["vocab_size"]
    rows = list(range(32000, vocab))
    adapter = _peft_adapter(ws["base"], tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                            trainable_token_indices={"embed_tokens": rows, "lm_head": rows})
    out = merge_adapter(MergeConfig(base=str(ws["base"]), adapter=str(adapter), out=str(tmp_path / "m")))
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["rows_patched"] == 2 * len(rows) and m["counts"]["replaced"] == 0
    ids = _ids(ws)
    assert (ids >= 32000).any()  # the dev text uses the trained rows
    ours, ref = _logits(out, ids), _logits(ws["base"], ids, adapter)
    assert (ours - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    # rows below 32000 are the base's own, bit for bit
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    base_index = json.loads((ws["base"] / "model.safetensors.index.json").read_text())["weight_map"]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        with safe_open(str(out / index[name]), "pt") as f, safe_open(str(ws["base"] / base_index[name]), "pt") as g:
            new, old = f.get_tensor(name), g.get_tensor(name)
        assert torch.equal(new[:32000], old[:32000]) and not torch.equal(new[32000:], old[32000:])
