"""Config dataclasses of `graft embed init` and `graft embed check` (no heavy imports here)."""
from __future__ import annotations

from dataclasses import dataclass, field

# Methods for new rows. Every one works from the old rows only (shard by shard, no forward pass).
INPUT_METHODS = ("mean", "hf-mean", "random", "first-last", "weighted-mean", "interpolation")
OUTPUT_ONLY_METHODS = ("prefix-share", "calibrated")
OUTPUT_METHODS = INPUT_METHODS + OUTPUT_ONLY_METHODS
METHODS = INPUT_METHODS  # kept for callers of the earlier name
# The lm_head method used when --output-method is left empty on an untied model and --calibration text is given
# (chosen by benchmarks/bench_embed_quality.py; see docs/embed_init.md); without calibration text lm_head follows
# --method. A tied model has one matrix: --method.
DEFAULT_OUTPUT_METHOD = "calibrated"


@dataclass
class EmbedInitConfig:
    """Grow embed_tokens and lm_head of a checkpoint for a larger (extended) tokenizer.

    Reads only the embedding tensors, hard-links (or copies) every shard without them, writes the grown
    tensors to a new shard (model-grown-embeddings.safetensors; the shards that held the old ones are
    rewritten without them), updates the index (weight_map, total_size), config.json (vocab_size) and
    copies the new tokenizer, so the output loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained.
    A single-file model.safetensors is rewritten as one file.

    --method sets the new embed_tokens rows, --output-method the new lm_head rows (default: calibrated when
    --calibration text is given, else as --method; a tied model has one matrix, set by --method). "Pieces" are the old ids the OLD
    tokenizer splits a new token's surface text into (no BOS/EOS, no dummy-prefix space); every row is
    computed in fp32 from the same matrix's old rows. Special tokens (no pieces) get the mean of all old rows.
      mean           mean of the pieces' rows.
      hf-mean        transformers' mean_resizing: a sample from N(mean of old rows, 1e-9 * their covariance).
      random         N(0, initializer_range) from config.json.
      first-last     mergekit tokensurgeon's first_last: embed_tokens takes the LAST piece's row, lm_head
                     the FIRST piece's.
      weighted-mean  pieces weighted 1..n towards the last piece (embed_tokens) or the first (lm_head).
      interpolation  unsloth's: (1 - a) * mean of all old rows + a * mean of the pieces' rows (a: --interpolation).
      prefix-share   (lm_head only) the first piece's row moved towards the mean of all old rows by
                     t = min(1, ln(k + 1) / (0.5 * ln V)), k = new tokens with the same first piece, V = old
                     vocabulary: wherever that piece has probability >= 1/sqrt(V) among the old ids, each of
                     the k new tokens scores at most 1/(k + 1) of the piece's probability, so together they
                     never take more than the piece had.
      calibrated     (lm_head only) the pieces' mean rows, each group of new tokens with the same first piece f
                     moved down by b along a direction r with h . r ~= 1 for the base model's final hidden
                     states h, b = max(0, ln(M / (s * P))): on --calibration text (old tokenizer, one
                     forward pass of the base model over --calibration-tokens tokens) the group then takes
                     about s (--calibration-share) times f's probability, M being what it took before and P
                     what f had (embed_init/calibrate.py).
    Padding rows (--pad-to-multiple-of) are the mean of the old rows in embed_tokens and 8x that mean in
    lm_head (a tied matrix too): their logit is 8x the mean old logit. That keeps them far below the probable
    ids where the mean old logit is negative, as measured on trained models (< 1e-6 of the probability on real
    text); it is not guaranteed for every model (docs/embed_init.md).

    Example:
      graft embed init --model base/ --old-tokenizer base/ --new-tokenizer merged_tok/ --out grown/
      graft embed init ... --method mean --output-method first-last
    """
    model: str = field(metadata={"help": "Hugging Face checkpoint folder (config.json + *.safetensors)"})
    old_tokenizer: str = field(metadata={"help": "the model's tokenizer: a SentencePiece .model or a HF folder "
                                                 "with tokenizer.model"})
    new_tokenizer: str = field(metadata={"help": "the extended tokenizer (.model or HF folder, e.g. from "
                                                 "`graft vocab merge`); its first pieces must equal the old ones"})
    out: str = field(metadata={"help": "output checkpoint folder (written atomically)"})
    method: str = field(default="mean", metadata={
        "help": "how new embed_tokens rows are initialised (and lm_head's when tied): " + " | ".join(INPUT_METHODS)})
    output_method: str = field(default="", metadata={
        "help": "how new lm_head rows are initialised: " + " | ".join(OUTPUT_METHODS) + "; empty = "
                f"{DEFAULT_OUTPUT_METHOD} on an untied model given --calibration text, else --method (a tied model "
                "has one matrix: --method)"})
    interpolation: float = field(default=0.5, metadata={
        "help": "weight a of the pieces' mean for method interpolation: (1 - a) * mean of all old rows + a * "
                "mean of the pieces' rows (unsloth's default 0.5)"})
    calibration: list[str] = field(default_factory=list, metadata={
        "help": "text files (.jsonl with a text field, .txt, .parquet) the base model reads once for "
                "--output-method calibrated, each an equal share of --calibration-tokens (e.g. one file per language of "
                "the continued-pretraining corpus)",
        "split": False})
    calibration_tokens: int = field(default=4096, metadata={
        "help": "tokens of --calibration text (old tokenizer) for --output-method calibrated"})
    calibration_share: float = field(default=0.25, metadata={
        "help": "--output-method calibrated: share of its first piece's probability each group of new tokens "
                "may take on the calibration text"})
    pad_to_multiple_of: int = field(default=0, metadata={
        "help": "pad the matrices to a multiple of N rows (e.g. 64 for tensor cores); padding rows are the "
                "mean of the old rows in embed_tokens and 8x it in lm_head (no probability), and config.vocab_size "
                "becomes the padded size. 0 = no padding"})
    seed: int = field(default=0, metadata={"help": "random seed (hf-mean and random)"})
    overwrite: bool = field(default=False, metadata={"help": "replace --out when it holds an output made with other "
                                                             "settings or inputs, or other files (the same ones: skipped)"})
    link: bool = field(default=True, metadata={
        "help": "hard-link unchanged shards instead of copying them (same filesystem only; falls back to copy)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:  # bad values fail when the config is built (CLI, workflow file)
        from common.errors import GraftError
        from common.validate import check_ranges

        if self.method in OUTPUT_ONLY_METHODS:
            raise GraftError(f"--method {self.method!r} sets lm_head rows only (it shares an old piece's output "
                             f"probability). Fix: pass it as --output-method {self.method} and pick --method from "
                             f"{', '.join(INPUT_METHODS)}")
        check_ranges(self, {"pad_to_multiple_of": ">=0", "interpolation": "[0,1]", "calibration_tokens": ">=1",
                            "calibration_share": ">0"},
                     choices={"method": INPUT_METHODS,  # an empty output_method is the default rule
                              **({"output_method": OUTPUT_METHODS} if self.output_method else {})})
        if self.output_method == "calibrated" and not self.calibration:
            raise GraftError("--output-method calibrated needs text to calibrate on. Fix: pass --calibration FILE "
                             "(e.g. a .jsonl of the continued-pretraining corpus), or pick another --output-method")


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
