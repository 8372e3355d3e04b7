"""Config dataclasses of `graft embed init` and `graft embed check` (no heavy imports here)."""
from __future__ import annotations

from dataclasses import dataclass, field

METHODS = ("mean", "hf-mean", "random")


@dataclass
class EmbedInitConfig:
    """Grow embed_tokens and lm_head of a checkpoint for a larger (extended) tokenizer.

    Reads only the embedding tensors, hard-links (or copies) every shard without them, writes the grown
    tensors to a new shard (model-grown-embeddings.safetensors; the shards that held the old ones are
    rewritten without them), updates the index (weight_map, total_size), config.json (vocab_size) and
    copies the new tokenizer, so the output loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained.
    A single-file model.safetensors is rewritten as one file.

    Methods for each new row:
      mean     mean (in fp32) of the old rows of the pieces the OLD tokenizer splits the token's surface
               text into, without BOS/EOS and without the dummy-prefix space; separately for lm_head
               when it is untied. Special tokens get the mean of all old rows.
      hf-mean  transformers' mean_resizing: a sample from N(mean of old rows, 1e-9 * their covariance).
      random   N(0, initializer_range) from config.json.

    Example:
      graft embed init --model base/ --old-tokenizer base/ --new-tokenizer merged_tok/ --out grown/
    """
    model: str = field(metadata={"help": "Hugging Face checkpoint folder (config.json + *.safetensors)"})
    old_tokenizer: str = field(metadata={"help": "the model's tokenizer: a SentencePiece .model or a HF folder "
                                                 "with tokenizer.model"})
    new_tokenizer: str = field(metadata={"help": "the extended tokenizer (.model or HF folder, e.g. from "
                                                 "`graft vocab merge`); its first pieces must equal the old ones"})
    out: str = field(metadata={"help": "output checkpoint folder (written atomically)"})
    method: str = field(default="mean", metadata={"help": "how new rows are initialised: mean | hf-mean | random"})
    pad_to_multiple_of: int = field(default=0, metadata={
        "help": "pad the matrices to a multiple of N rows (e.g. 64 for tensor cores); padding rows are the "
                "mean of the old rows and config.vocab_size becomes the padded size. 0 = no padding"})
    seed: int = field(default=0, metadata={"help": "random seed (hf-mean and random)"})
    overwrite: bool = field(default=False, metadata={"help": "replace --out when it holds an output made with other "
                                                             "settings or inputs, or other files (the same ones: skipped)"})
    link: bool = field(default=True, metadata={
        "help": "hard-link unchanged shards instead of copying them (same filesystem only; falls back to copy)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:  # bad values fail when the config is built (CLI, workflow file)
        from common.errors import GraftError
        from common.validate import check_ranges

        if self.method not in METHODS:
            raise GraftError(f"--method {self.method!r} is not one of {', '.join(METHODS)}. Fix: pick one of them")
        check_ranges(self, {"pad_to_multiple_of": ">=0"})


@dataclass
class EmbedCheckConfig:
    """Check a folder written by `graft embed init` against the model it was grown from.

    Confirms: old rows of embed_tokens (and lm_head) are bit-identical; every other tensor is unchanged;
    the matrices' shapes agree with config.json and the new tokenizer; new rows are finite; and a forward
    pass over text that the new tokenizer encodes exactly like the old one gives the same logits for the
    old ids. Writes OUT/check.json and exits with an error if any check fails.

    Example:
      graft embed check grown/ --model base/
    """
    out: str = field(metadata={"help": "folder written by `graft embed init`"})
    model: str = field(metadata={"help": "the original checkpoint folder it was grown from"})
    old_tokenizer: str | None = field(default=None, metadata={
        "help": "the old tokenizer (default: the one recorded in OUT/manifest.json)"})
    forward: bool = field(default=True, metadata={
        "help": "run the forward-pass check (loads both models; turn off for models that do not fit in RAM)"})
    max_tokens: int = field(default=256, metadata={"help": "tokens of text for the forward-pass check"})
    atol: float = field(default=0.0, metadata={
        "help": "allowed absolute difference of old-id logits (0 = must be identical)"})

    def __post_init__(self) -> None:
        from common.validate import check_ranges

        check_ranges(self, {"max_tokens": ">=1", "atol": ">=0"})
