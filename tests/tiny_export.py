"""A tiny grafted Mixtral, merged, as the demo chain writes it (for tests/test_export_gguf.py; no downloads).

Mixtral's real tokenizer.model (mistral-common) grafted with `graft vocab merge` (a candidate trained on the
first 3,000 People's Daily lines, plus two special tokens), `graft embed init --pad-to-multiple-of 64` onto a
tiny Mixtral, two QLoRA steps of `graft train`, and `graft merge` in fp32.
"""
from __future__ import annotations

from pathlib import Path

TRAIN_LINES = 3000  # People's Daily lines the vocabulary is trained on; later lines are held out


def grafted_mixtral(root: str | Path) -> dict[str, Path]:
    """{"tok", "base", "grown", "merged"} under `root`; built once (later calls reuse it)."""
    from demo.tiny import save_tiny_mixtral
    from continual.config import MergeConfig as AdapterMergeConfig
    from continual.merge import merge_adapter
    from tiny_continual import make_blocks, tiny_train_config
    from continual.train import train
    from demo import sources
    from embed_init.config import EmbedInitConfig
    from embed_init.grow import grow_embeddings
    from vocab.merge import VocabMergeConfig, merge_into_base
    from vocab.train import VocabTrainConfig, train_candidates

    from common.io import read_manifest

    root = Path(root)
    paths = {k: root / k for k in ("tok", "base", "grown", "merged")}
    if (root / "ready").is_file():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    corpus = sources.write_jsonl(root / "zh.jsonl", sources.people_daily_lines()[:TRAIN_LINES])
    cands = train_candidates(VocabTrainConfig(inputs=[str(corpus)], out=str(root / "cands"), chars=[1200],
                                              sizes=["2500"], progress=False))
    cand = cands / read_manifest(cands)["candidates"][0]["path"]
    base_tok = sources.base_tokenizer_model()
    merge_into_base(VocabMergeConfig(base=str(base_tok), add=str(cand), out=str(paths["tok"]),
                                     special=["<|im_start|>", "<|im_end|>"]))
    save_tiny_mixtral(paths["base"])
    grow_embeddings(EmbedInitConfig(model=str(paths["base"]), old_tokenizer=str(base_tok),
                                    new_tokenizer=str(paths["tok"]), out=str(paths["grown"]),
                                    pad_to_multiple_of=64, progress=False))
    make_blocks(root / "data", paths["grown"], block_len=32, n_train=16, n_dev=4)
    run = train(tiny_train_config({"base": paths["grown"], "data": root / "data"}, root / "train", max_steps=2,
                                  eval_every=0, save_every=0))
    merge_adapter(AdapterMergeConfig(base=str(paths["grown"]), adapter=str(run / "adapter"),
                                     out=str(paths["merged"]), dtype="fp32"))
    (root / "ready").write_text("ok")
    return paths
