"""A byte-level BPE vocabulary stored in a GGUF file (llama.cpp) as a Hugging Face `tokenizer.json`.

llama.cpp keeps a model's tokenizer in the GGUF metadata: `tokenizer.ggml.model` ("gpt2" = byte-level BPE),
`tokens`, `token_type`, `merges` and `tokenizer.ggml.pre`, the name of the pre-tokenizer (its regex lives in
llama.cpp's src/llama-vocab.cpp, not in the file). llama.cpp ships vocab-only files of real tokenizers with
reference ids written by the Hugging Face tokenizers (`models/ggml-vocab-NAME.gguf` + `.inp`/`.out`; the
llama-cpp-python sdist pinned in export/llama_cpp.py vendors them), so a real Llama-3 or Qwen2 vocabulary is
available offline. `gguf_to_tokenizer(path)` rebuilds the `tokenizer.json`:

- ids: the GGUF token list as is; NORMAL tokens are the BPE vocabulary, CONTROL tokens become special added
  tokens and USER_DEFINED ones non-special added tokens (not normalized); the padding convert_hf_to_gguf.py
  appends up to config.json's vocab_size (`[PAD<id>]`, USER_DEFINED or UNUSED) is dropped, as the HF
  tokenizer has no such ids;
- merges: `tokenizer.ggml.merges` in order;
- the pre-tokenizer of `tokenizer.ggml.pre` (PRE_TOKENIZERS: Llama-3's "llama-bpe" and Qwen2's "qwen2", with
  the original regexes of their tokenizer.json, `ignore_merges`, normalizer and BOS handling); another name is
  refused with the list.

tests/test_gguf_vocab.py checks the result against the `.out` ids of llama.cpp's files.
"""
from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import input_error

MAGIC = b"GGUF"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_PAD = re.compile(r"\[PAD(\d+)\]")

# Split regexes as in each family's tokenizer.json (llama.cpp's llama-vocab.cpp quotes them as "original regex").
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """What `tokenizer.ggml.pre` stands for in the family's tokenizer.json."""
    family: str
    regex: str
    ignore_merges: bool
    nfc: bool              # NFC normalizer
    trim_offsets: bool     # ByteLevel pre-tokenizer option (offsets only)
    add_bos: bool          # BOS added by the post-processor


_LLAMA3 = PreTokenizer("Llama-3", _LLAMA3_REGEX, ignore_merges=True, nfc=False, trim_offsets=True, add_bos=True)
_QWEN2 = PreTokenizer("Qwen2", _QWEN2_REGEX, ignore_merges=False, nfc=True, trim_offsets=False, add_bos=False)
# names llama.cpp gives these pre-tokenizers (src/llama-vocab.cpp); others are refused
PRE_TOKENIZERS = {"llama-bpe": _LLAMA3, "llama3": _LLAMA3, "llama-v3": _LLAMA3, "qwen2": _QWEN2}


def is_gguf_file(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == MAGIC


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (v2/v3); strings as bytes, arrays as lists. Tensors are not read."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        pos = 0

        def take(fmt: str):
            nonlocal pos
            (v,) = struct.unpack_from("<" + fmt, data, pos)
            pos += struct.calcsize("<" + fmt)
            return v

        def string() -> bytes:
            nonlocal pos
            n = take("Q")
            v = data[pos:pos + n]
            pos += n
            return v

        def value(kind: int):
            nonlocal pos
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                item, n = take("I"), take("Q")
                if item == _STRING:
                    return [string() for _ in range(n)]
                fmt = _SCALARS[item]
                out = list(struct.unpack_from(f"<{n}{fmt}", data, pos))
                pos += n * struct.calcsize(fmt)
                return out
            return take(_SCALARS[kind])

        try:
            if data[:4] != MAGIC:
                raise input_error(path, "is not a GGUF file (no GGUF magic)", "pass a llama.cpp .gguf file")
            pos = 4
            version, _tensors, n_kv = take("I"), take("Q"), take("Q")
            if version < 2:
                raise input_error(path, f"is GGUF version {version}", "re-convert it with a current llama.cpp")
            meta = {}
            for _ in range(n_kv):
                key = string().decode("utf-8")
                meta[key] = value(take("I"))
        except (struct.error, KeyError, UnicodeDecodeError) as e:
            raise input_error(path, f"GGUF metadata is truncated or corrupt ({type(e).__name__}: {e})",
                              "re-download the file") from None
    return meta


@dataclass
class GgufVocabInfo:
    pre: str                   # tokenizer.ggml.pre
    family: str
    n_vocab: int               # ids kept (padding dropped)
    n_padding: int             # [PAD<id>] ids dropped
    specials: dict[int, str]   # CONTROL tokens
    user_defined: dict[int, str]
    bos: str | None
    eos: str | None
    pad: str | None
    add_bos: bool
    chat_template: str | None


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, bytearray)) else str(v)


def gguf_to_tokenizer(path: str | Path):
    """(tokenizers.Tokenizer, GgufVocabInfo) for a GGUF file whose tokenizer is a byte-level BPE."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    path = Path(path)
    meta = read_gguf_metadata(path)
    model = _text(meta.get("tokenizer.ggml.model", b""))
    if model != "gpt2":
        raise input_error(path, f"its tokenizer model is {model or 'missing'!r}, not 'gpt2' (byte-level BPE)",
                          "a SentencePiece GGUF has no tokenizer.json to grow: pass the model's tokenizer.model")
    pre = _text(meta.get("tokenizer.ggml.pre", b""))
    if pre not in PRE_TOKENIZERS:
        raise input_error(path, f"its pre-tokenizer is {pre or 'missing'!r}; vocab-graft knows "
                          f"{', '.join(sorted(PRE_TOKENIZERS))}",
                          "pass the model's own tokenizer.json (a Hugging Face folder) instead")
    spec = PRE_TOKENIZERS[pre]
    try:
        tokens = [_text(t) for t in meta["tokenizer.ggml.tokens"]]
        types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        merges = [tuple(_text(m).split(" ")) for m in meta["tokenizer.ggml.merges"]]
    except KeyError as e:
        raise input_error(path, f"GGUF metadata lacks {e}", "pass a GGUF file with a full tokenizer") from None
    if len(types) != len(tokens):
        raise input_error(path, f"{len(tokens)} tokens but {len(types)} token types", "re-download the file")
    bad = next((i for i, m in enumerate(merges) if len(m) != 2), None)
    if bad is not None:
        raise input_error(path, f"tokenizer.ggml.merges[{bad}] is not two tokens", "re-download the file")
    n = len(tokens)
    while n and types[n - 1] in (USER_DEFINED, UNUSED) and (m := _PAD.fullmatch(tokens[n - 1])) \
            and int(m.group(1)) == n - 1:
        n -= 1
    vocab, specials, user = {}, {}, {}
    for i in range(n):
        t = types[i]
        if t == CONTROL:
            specials[i] = tokens[i]
        elif t == USER_DEFINED:
            user[i] = tokens[i]
        else:
            vocab[tokens[i]] = i
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=spec.ignore_merges))
    if spec.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec.regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=spec.trim_offsets, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # added tokens in id order, so each keeps its GGUF id (tokenizers appends them after the vocabulary)
    added = sorted([(i, s, True) for i, s in specials.items()] + [(i, s, False) for i, s in user.items()])
    for i, s, special in added:
        token = AddedToken(s, special=special, normalized=False)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        if tok.token_to_id(s) != i:
            raise input_error(path, f"token {s!r} (id {i}) would get id {tok.token_to_id(s)}: the ids are not "
                              "contiguous", "pass the model's own tokenizer.json instead")

    def token_of(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < n else None

    bos = token_of("bos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", spec.add_bos))
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos and bos:
        tok.post_processor = processors.Sequence([
            byte_level, processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    else:
        tok.post_processor = byte_level
    template = meta.get("tokenizer.chat_template")
    info = GgufVocabInfo(pre, spec.family, n, len(tokens) - n, specials, user, bos, token_of("eos"),
                         token_of("padding"), add_bos, _text(template) if template is not None else None)
    return tok, info


def gguf_hf_config(info: GgufVocabInfo) -> tuple[dict, dict]:
    """tokenizer_config.json and special_tokens_map.json for a converted GGUF vocabulary."""
    named = {"bos_token": info.bos, "eos_token": info.eos, "pad_token": info.pad}
    present = {k: v for k, v in named.items() if v}
    added = sorted([(i, s, True) for i, s in info.specials.items()] + [(i, s, False) for i, s in info.user_defined.items()])
    decoder = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": special} for i, s, special in added}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1000000000000000019884624838656, "added_tokens_decoder": decoder,
              "add_bos_token": info.add_bos, "add_eos_token": False, **present}
    if not info.bos:
        config["bos_token"] = None
    if info.chat_template:
        config["chat_template"] = info.chat_template
    return config, dict(present)


def read_vocab_tests(gguf: str | Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's reference cases next to a ggml-vocab file: (text, ids) from `NAME.gguf.inp` / `.out`
    (texts separated by "\\n__ggml_vocab_test__\\n"; one line of ids per text, written by the HF tokenizer with
    add_special_tokens=False; convert_hf_to_gguf_update.py)."""
    gguf = Path(gguf)
    inp, out = Path(f"{gguf}.inp"), Path(f"{gguf}.out")
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts.pop()
    lines = out.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != len(texts):
        raise input_error(out, f"{len(lines)} lines of ids for {len(texts)} texts in {inp.name}",
                          "use an unmodified pair of files")
    return [(t, [int(x) for x in ln.split()]) for t, ln in zip(texts, lines)]


__all__ = ["PRE_TOKENIZERS", "is_gguf_file", "read_gguf_metadata", "gguf_to_tokenizer", "gguf_hf_config",
           "GgufVocabInfo", "read_vocab_tests"]
