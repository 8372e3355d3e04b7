"""corpus prepare -> train (QLoRA) -> merge on a tiny dense Mistral whose tokenizer is a byte-level graft of the
real tekken base (the layout of Mistral-Nemo: MistralForCausalLM, 131,072 ids + the new ones)."""
from __future__ import annotations

import json

import torch

from demo.tiny import save_tiny_mistral
from demo import sources

DENSE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_prepare_train_merge_with_a_tekken_graft(tmp_path, tekken_path, news_lines, english_paragraphs):
    from continual.config import MergeConfig as AdapterMergeConfig
    from continual.config import TrainConfig as QLoRAConfig
    from continual.merge import merge_adapter
    from continual.train import train
    from corpus.blocks import load_blocks
    from corpus.prepare import PrepareConfig, prepare
    from embed_init.config import EmbedInitConfig
    from embed_init.grow import grow_embeddings
    from vocab.merge import VocabMergeConfig, merge_into_base
    from vocab.train import VocabTrainConfig, train_candidates

    zh = sources.write_jsonl(tmp_path / "zh.jsonl", news_lines[:2000])
    cands = train_candidates(VocabTrainConfig(inputs=[str(zh)], out=str(tmp_path / "cands"), base=str(tekken_path),
                                              sizes=["1000"], progress=False))
    tok = merge_into_base(VocabMergeConfig(base=str(tekken_path), add=str(cands / "candidates/added1000.json"),
                                           out=str(tmp_path / "tok")))
    base = save_tiny_mistral(tmp_path / "base")
    grown = grow_embeddings(EmbedInitConfig(model=str(base), old_tokenizer=str(tekken_path), new_tokenizer=str(tok),
                                            out=str(tmp_path / "grown"), pad_to_multiple_of=64, progress=False))
    mixed = sources.write_jsonl(tmp_path / "mixed.jsonl", list(news_lines[2000:2300]) + list(english_paragraphs[:80]))
    corpus = prepare(PrepareConfig(name="mixed", tokenizer=str(grown), out=str(tmp_path / "corpus"), block_size=32,
                                   files=[str(mixed)], split="4:1", progress=False))
    m = json.loads((corpus / "manifest.json").read_text())
    assert m["bos"] is True and m["tokenizer"]["bos_id"] == 1 and m["tokenizer"]["eos_id"] == 2
    blocks = load_blocks(corpus, "train")
    ids = torch.tensor(blocks[:]["input_ids"])
    assert int(ids.max()) >= 131072  # new tokens in the training data
    assert int(ids.max()) < 131072 + 1000
    out = train(QLoRAConfig(model=str(grown), train_data=str(corpus), out=str(tmp_path / "run"), lora_r=8,
                            lora_alpha=16, target_modules=DENSE_TARGETS, embeddings="new-rows",
                            learning_rate=5e-3, embedding_lr=5e-3, micro_batch_size=2, max_steps=3, eval_every=0,
                            save_every=0, eval_blocks=4, warmup_ratio=0.0, progress=False))
    tm = json.loads((out / "manifest.json").read_text())
    # every Linear of the dense layers is 4-bit (gate_proj too: only the MoE router `gate` is kept out)
    # q, o: 32x32; k, v: 32x16 (2 kv heads x 8); gate/up/down: 32x64; 2 layers
    assert tm["counts"]["params_4bit"] == 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64), tm["counts"]
    assert tm["final_dev"]["dev_bpb"] > 0
    merged = merge_adapter(AdapterMergeConfig(base=str(grown), adapter=str(out / "adapter"), out=str(tmp_path / "m"),
                                              dtype="fp32"))
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["vocab_size"] == 131072 + 1024 and cfg["architectures"] == ["MistralForCausalLM"]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(merged), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32)
    text = news_lines[2500]
    x = hf_tok(text, return_tensors="pt")["input_ids"]
    assert x[0, 0].item() == 1 and x.max().item() >= 131072
    # transformers 4.57.3+ warns that a local "mistral" checkpoint may carry Mistral's old, wrong regex and offers
    # fix_mistral_regex=True, which puts tekken's pattern in front; ours already is that pattern: same ids
    fixed = AutoTokenizer.from_pretrained(str(merged), local_files_only=True, fix_mistral_regex=True)
    assert fixed(text)["input_ids"] == x[0].tolist()
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()
