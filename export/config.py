"""Config of `graft export gguf` (no heavy imports: `graft --help` reads it)."""
from __future__ import annotations

from dataclasses import dataclass, field

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass
class GgufConfig:
    """Convert a merged checkpoint to GGUF with llama.cpp's own convert_hf_to_gguf.py and gguf-py.

    The llama.cpp revision is pinned (export/llama_cpp.py: the one vendored in llama-cpp-python 0.3.36;
    `make llama-cpp` fetches it). Before converting, the vocabulary sizes of config.json, embed_tokens,
    lm_head and the tokenizer must agree; padded rows (graft embed init --pad-to-multiple-of) become
    unused tokens, checked in the written file. SentencePiece bases (Llama, Mistral, Mixtral) and byte-level
    BPE bases (Llama-3, Qwen2, Mistral-Nemo; --pre-tokenizer names the base's pre-tokenizer).

      graft export gguf --model runs/merged --out runs/merged-q8_0.gguf --outtype q8_0
      graft export gguf --model runs/llama3_merged --out runs/llama3.gguf --pre-tokenizer llama-bpe
    """

    model: str = field(metadata={"help": "merged checkpoint folder (`graft merge` output, or any HF checkpoint "
                                         "with tokenizer.model)"})
    out: str = field(metadata={"help": "FILE.gguf; a path not ending in .gguf is a folder that gets "
                                       "model-OUTTYPE.gguf and manifest.json (workflow stages)"})
    outtype: str = field(default="f16", metadata={"help": "tensor type: " + ", ".join(OUTTYPES)})
    llama_cpp: str | None = field(default=None, metadata={
        "help": "llama.cpp source folder holding convert_hf_to_gguf.py and gguf-py (default: $GRAFT_LLAMA_CPP, "
                "else .cache/llama.cpp/REVISION in this checkout, written by `make llama-cpp`)"})
    pre_tokenizer: str | None = field(default=None, metadata={
        "help": "byte-level checkpoints (tokenizer.json, no tokenizer.model): llama.cpp's name of the base's "
                "pre-tokenizer, e.g. llama-bpe (Llama-3), qwen2, tekken (Mistral-Nemo). llama.cpp's converter "
                "recognises a tokenizer by a hash of its ids on a test text, which a graft changes; this tells it "
                "the name (`graft vocab convert` of a GGUF base records it as gguf_pre_tokenizer)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})
    progress: bool = field(default=True, metadata={"help": "show the converter's output while it runs"})

    def __post_init__(self) -> None:  # a bad outtype fails when the config is built (CLI, workflow file)
        from common.validate import check_ranges

        check_ranges(self, {}, choices={"outtype": OUTTYPES})

    def validate(self) -> "GgufConfig":
        """Ready to run: values set after the config was built are checked too."""
        self.__post_init__()
        return self
