"""workflows/chinese-nemo.toml (the byte-level recipe) validates, and the byte-level stages run as a workflow:
vocab train -> score -> pick -> merge -> audit -> embed init on the real tekken base and a tiny dense Mistral."""
from __future__ import annotations

import json
from pathlib import Path

from workflows.spec import load_workflow

REPO = Path(__file__).resolve().parents[1]


def test_nemo_recipe_parses_and_validates():
    wf = load_workflow(REPO / "workflows" / "chinese-nemo.toml")
    names = [s.name for s in wf.stages]
    assert names[:4] == ["vocab_train", "vocab_score", "vocab_pick", "vocab_merge"] and names[-1] == "report"
    v = wf.stage("vocab_train").values
    assert v["base"].endswith("Mistral-Nemo-Base-2407/tekken.json") and "chars" not in v
    assert wf.stage("vocab_merge").values["base"] == v["base"]
    assert wf.stage("embed_init").values["model"] == "models/Mistral-Nemo-Base-2407"
    t = wf.stage("train").values
    assert t["target_modules"] == ["auto"]
    for s in wf.stages:
        if s.kind.name == "corpus.prepare":
            assert s.deps == ["vocab_merge"]


def test_nemo_auto_targets_are_the_dense_layers(tmp_path):
    """target_modules = auto on MistralForCausalLM (Mistral-Nemo's class): attention + the dense MLP, no router
    loss, and only lm_head out of 4-bit."""
    from transformers import MistralConfig

    from demo.tiny import save_tiny_mistral
    from continual import arch as A
    from continual.model import lora_targets, read_model_config

    model = save_tiny_mistral(tmp_path / "nemo", vocab_size=256)
    assert lora_targets(model, ["auto"]) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"]
    assert A.skip_modules(read_model_config(model)) == ["lm_head"] and not A.has_aux_loss(MistralConfig())


def test_byte_level_stages_run_as_a_workflow(tmp_path, tekken_path):
    from demo.tiny import save_tiny_mistral
    from demo.sources import write_demo_corpora
    from workflows.engine import run_workflow

    data = write_demo_corpora(tmp_path / "data")
    model = save_tiny_mistral(tmp_path / "nemo")
    wf_path = tmp_path / "w.toml"
    wf_path.write_text(f"""
[workflow]
name = "nemo-mini"
runs = "{tmp_path / 'runs'}"

[vocab_train]
inputs = ["{data['zh_news']}"]
base = "{tekken_path}"
sizes = ["1000:2000:1000"]
max_sentences = 3000

[vocab_score]
candidates_dir = "@vocab_train"
corpus = ["{data['zh_news_dev']}"]
base = "{tekken_path}"

[vocab_pick]
scores = "@vocab_score"
size = 2000

[vocab_merge]
base = "{tekken_path}"
add = "@vocab_pick#pick.path"
special = ["<|im_start|>", "<|im_end|>"]

[audit]
tokenizers = ["{tekken_path}", "@vocab_merge"]
corpus = ["{data['zh_news_dev']}", "{data['en_pydoc']}"]

[embed_init]
model = "{model}"
old_tokenizer = "{tekken_path}"
new_tokenizer = "@vocab_merge"
pad_to_multiple_of = 64
""")
    lines: list[str] = []
    statuses = run_workflow(load_workflow(wf_path), echo=lines.append)
    assert all(s.state == "done" for s in statuses), lines
    runs = tmp_path / "runs" / "nemo-mini"
    pick = json.loads((runs / "vocab_pick" / "manifest.json").read_text())["pick"]
    assert pick["size"] == 2000 and pick["path"].endswith("chosen.json")
    merged = json.loads((runs / "vocab_merge" / "manifest.json").read_text())
    assert merged["kind"] == "bytelevel" and merged["counts"]["vocab_size"] == 131072 + 2000 + 2
    grown = json.loads((runs / "embed_init" / "config.json").read_text())
    assert grown["vocab_size"] == 131072 + 2048
    audit = json.loads((runs / "audit" / "audit.json").read_text())
    rows = audit["rows"] if isinstance(audit, dict) else audit
    zh = [r for r in rows if r["corpus"].endswith("zh_news_dev.jsonl")]
    en = [r for r in rows if r["corpus"].endswith("en_pydoc.jsonl")]
    assert zh[1]["tokens"] < 0.85 * zh[0]["tokens"] and en[1]["tokens"] == en[0]["tokens"]
