"""Byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2, Mistral-Nemo "tekken"): open, validate, convert.

- `tokenizer_family(path)`: "sentencepiece" (a `.model`, or a folder with `tokenizer.model`, with or without
  `tokenizer.json`: today's path) or "bytelevel" (a folder or `tokenizer.json` whose model is a byte-level BPE,
  or a tekken JSON); any other tokenizer gets one error naming the file and what is supported.
- `load_bytelevel(path)` -> `ByteLevelTokenizer`: the `tokenizer.json` as data, its `tokenizer_config.json`
  and the `tokenizers.Tokenizer`, checked to be a byte-level BPE.
- a GGUF file is refused with the command that converts it (`graft vocab convert`, common/gguf_vocab.py).
- `tekken_to_json(path)`: Mistral's tekken file (mistral-common's `Tekkenizer` format) as a `tokenizer.json`,
  built with `tokenizers`. transformers 4.57's `convert_tekken_tokenizer` fails on mistral-common 1.13
  (special tokens are dicts there), so the conversion is done here, and tested token for token against
  `Tekkenizer.encode` (tests/test_bytelevel.py):
  * ids: the special tokens first (the file's `special_tokens`, else mistral-common's 20 default ones, then
    `<SPECIAL_i>` fillers up to `default_num_special_tokens`), then the first `default_vocab_size -
    default_num_special_tokens` ranks at id = rank + number of specials;
  * merges derived from the ranks: every split of a token into two tokens, ordered by the token's rank (then
    by the ranks of the left and right parts), as tiktoken's rank-ordered merging implies;
  * pre-tokenizer: the config's `pattern` as a `Split` (isolated), then `ByteLevel(use_regex=False)`;
  * `ignore_merges=True`: tiktoken takes a whole pre-token found in the vocabulary as one token.

Byte-level strings: each byte is one printable character (GPT-2's `bytes_to_unicode`), so a token's bytes
are `from_bytelevel(token)`. A token need not be valid UTF-8 on its own (e.g. the first two bytes of a
Chinese character).
"""
from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import GraftError, input_error

HF_FILE = "tokenizer.json"
SPM_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
SUPPORTED = ("SentencePiece BPE (a tokenizer.model, or a folder holding one: Llama-2, Mistral-7B, Mixtral) or "
             "byte-level BPE (a tokenizer.json with a ByteLevel pre-tokenizer: GPT-2, Llama-3, Qwen2/2.5/3, "
             "Mistral-Nemo; or Mistral's tekken JSON)")

# mistral-common's default special tokens for tekken files that do not list them (Tekkenizer.DEPRECATED_SPECIAL_TOKENS)
TEKKEN_DEFAULT_SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                           "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                           "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                           "[TOOL_CONTENT]")
TEKKEN_FILLER = "<SPECIAL_{id}>"


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (the alphabet of every byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@functools.lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def to_bytelevel(data: bytes) -> str:
    m = byte_to_unicode()
    return "".join(m[b] for b in data)


def from_bytelevel(token: str) -> bytes:
    """The bytes a byte-level token stands for (KeyError for a character outside the byte alphabet)."""
    m = unicode_to_byte()
    return bytes(m[c] for c in token)


def bytes_or_none(token: str) -> bytes | None:
    """`from_bytelevel(token)`, or None for a string outside the byte alphabet."""
    try:
        return from_bytelevel(token)
    except KeyError:
        return None


def token_text(token: str) -> str:
    """A byte-level token shown as text: its bytes decoded, undecodable bytes as \\xNN. A string outside the byte
    alphabet (a special token stored in the vocabulary, e.g. "<｜begin▁of▁sentence｜>") is returned as it is."""
    try:
        return from_bytelevel(token).decode("utf-8", errors="backslashreplace")
    except KeyError:
        return token


# ---------------------------------------------------------------------------------------------
# tekken

def _read_json(path: Path) -> Any:
    from common.io import open_input

    with open_input(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise input_error(path, "not UTF-8 text (a binary file?)", "pass a tokenizer.json or a tekken JSON") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise input_error(path, f"not valid JSON ({e.msg})", "re-download or re-save the tokenizer file",
                          line=e.lineno) from None


def is_tekken_data(data: Any) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("config"), dict) and isinstance(data.get("vocab"), list)
            and "pattern" in data["config"] and (not data["vocab"] or "token_bytes" in data["vocab"][0]))


def is_tekken_file(path: str | Path) -> bool:
    """True for a .json file in mistral-common's tekken layout (config + ranked vocab of token_bytes)."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".json"):
        return False
    with open(p, "rb") as f:
        head = f.read(4096)
    if b'"config"' not in head and b'"vocab"' not in head:
        return False
    return is_tekken_data(_read_json(p))


def _tekken_specials(data: dict, path: Path, n_special: int) -> list[str]:
    listed = data.get("special_tokens")
    if listed is None:
        names = list(TEKKEN_DEFAULT_SPECIALS)
    else:
        names = []
        for i, t in enumerate(listed):
            if not isinstance(t, dict) or t.get("rank") != i or not isinstance(t.get("token_str"), str):
                raise input_error(path, f"special_tokens[{i}] is not {{'rank': {i}, 'token_str': ...}}",
                                  "pass an unmodified tekken file from mistral-common or the model repository")
            names.append(t["token_str"])
    if len(names) > n_special:
        raise input_error(path, f"lists {len(names)} special tokens but config.default_num_special_tokens is "
                          f"{n_special}", "pass an unmodified tekken file")
    names += [TEKKEN_FILLER.format(id=i) for i in range(len(names), n_special)]
    if len(set(names)) != len(names):
        raise input_error(path, "special tokens are not unique", "pass an unmodified tekken file")
    return names


def bpe_merges_from_ranks(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Merges implied by tiktoken-style ranks: for each token in rank order, every split into two tokens,
    the splits ordered by the ranks of their left, then right parts."""
    rank = {b: i for i, b in enumerate(tokens)}
    merges = []
    for b in tokens:
        if len(b) < 2:
            continue
        local = [(b[:k], b[k:]) for k in range(1, len(b)) if b[:k] in rank and b[k:] in rank]
        local.sort(key=lambda m: (rank[m[0]], rank[m[1]]))
        merges.extend(local)
    return merges


@dataclass
class TekkenInfo:
    specials: list[str]
    n_special: int
    n_vocab: int          # regular tokens (ranks) kept
    pattern: str
    version: str | None


def tekken_to_tokenizer(path: str | Path):
    """(tokenizers.Tokenizer, TekkenInfo) for a tekken JSON file (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    path = Path(path)
    data = _read_json(path)
    if not is_tekken_data(data):
        raise input_error(path, "is not a tekken tokenizer file (expects 'config' with 'pattern' and a 'vocab' "
                          "list of {rank, token_bytes, token_str})", f"pass Mistral's tekken.json, or a {HF_FILE}")
    cfg = data["config"]
    try:
        n_special = int(cfg["default_num_special_tokens"])
        n_vocab = int(cfg["default_vocab_size"]) - n_special
        pattern = str(cfg["pattern"])
    except (KeyError, TypeError, ValueError) as e:
        raise input_error(path, f"config lacks {e} (default_vocab_size, default_num_special_tokens, pattern)",
                          "pass an unmodified tekken file") from None
    vocab_list = data["vocab"]
    if len(vocab_list) < n_vocab:
        raise input_error(path, f"has {len(vocab_list)} ranks, fewer than default_vocab_size - "
                          f"default_num_special_tokens = {n_vocab}", "pass an unmodified tekken file")
    tokens = []
    for i, v in enumerate(vocab_list[:n_vocab]):
        if v.get("rank") != i:
            raise input_error(path, f"vocab[{i}] has rank {v.get('rank')!r}", "pass an unmodified tekken file")
        tokens.append(base64.b64decode(v["token_bytes"]))
    if sorted(set(t for t in tokens if len(t) == 1)) != [bytes([b]) for b in range(256)]:
        raise input_error(path, "the first ranks do not hold all 256 single bytes", "pass an unmodified tekken file")
    specials = _tekken_specials(data, path, n_special)
    vocab = {s: i for i, s in enumerate(specials)}
    for i, b in enumerate(tokens):
        vocab[to_bytelevel(b)] = i + n_special
    if len(vocab) != n_special + n_vocab:
        raise input_error(path, "token strings collide (a special token equals a regular token's byte string)",
                          "pass an unmodified tekken file")
    merges = [(to_bytelevel(a), to_bytelevel(b)) for a, b in bpe_merges_from_ranks(tokens)]
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = specials[1] if len(specials) > 1 and specials[1] == "<s>" else None
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, 1)])
    return tok, TekkenInfo(specials, n_special, n_vocab, pattern, cfg.get("version"))


def tekken_hf_config(info: TekkenInfo) -> tuple[dict, dict]:
    """tokenizer_config.json and special_tokens_map.json for a converted tekken tokenizer."""
    named = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    present = {k: v for k, v in named.items() if v in info.specials}
    decoder = {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for i, s in enumerate(info.specials)}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1000000000000000019884624838656, "added_tokens_decoder": decoder,
              "add_bos_token": True, "add_eos_token": False, **present}
    return config, dict(present)


# ---------------------------------------------------------------------------------------------
# tokenizer.json

def _pre_tokenizer_parts(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for q in pre.get("pretokenizers", []) for p in _pre_tokenizer_parts(q)]
    return [pre]


def _decoder_parts(dec: dict | None) -> list[dict]:
    if not dec:
        return []
    if dec.get("type") == "Sequence":
        return [p for q in dec.get("decoders", []) for p in _decoder_parts(q)]
    return [dec]


def parse_merges(merges: list, file: Path) -> list[tuple[str, str]]:
    """tokenizer.json merges, stored as pairs (tokenizers >= 0.20) or "a b" strings, as pairs."""
    out = []
    for i, m in enumerate(merges):
        if isinstance(m, str):
            parts = m.split(" ")
        else:
            parts = list(m)
        if len(parts) != 2:
            raise input_error(file, f"model.merges[{i}] = {m!r} is not a pair of tokens",
                              "re-save the tokenizer with `tokenizers` >= 0.20")
        out.append((parts[0], parts[1]))
    return out


def bytelevel_problem(data: dict) -> str | None:
    """Why a tokenizer.json (as data) is not a byte-level BPE vocab-graft can grow; None when it is one."""
    model = data.get("model") or {}
    kind = model.get("type") or ("BPE" if "merges" in model else None)
    if kind != "BPE":
        return f"its model is {kind or 'of unknown type'}, not BPE"
    parts = _pre_tokenizer_parts(data.get("pre_tokenizer"))
    if not any(p.get("type") == "ByteLevel" for p in parts):
        names = ", ".join(p.get("type", "?") for p in parts) or "none"
        return f"it is a BPE without a ByteLevel pre-tokenizer (pre-tokenizer: {names})"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "its BPE uses continuing_subword_prefix / end_of_word_suffix"
    if not any(d.get("type") == "ByteLevel" for d in _decoder_parts(data.get("decoder"))):
        return "it has no ByteLevel decoder"
    vocab = model.get("vocab") or {}
    missing = [c for c in byte_to_unicode().values() if c not in vocab]
    if missing:
        return f"its vocabulary lacks {len(missing)} of the 256 byte tokens (e.g. {missing[0]!r})"
    return None


@dataclass
class ByteLevelTokenizer:
    """A byte-level BPE tokenizer as files: `data` is the tokenizer.json content."""
    path: Path                  # what was passed (folder, tokenizer.json or tekken JSON)
    file: Path                  # the file read
    source: str                 # "tokenizer.json" or "tekken"
    data: dict = field(repr=False)
    config: dict = field(default_factory=dict, repr=False)       # tokenizer_config.json
    special_map: dict = field(default_factory=dict, repr=False)  # special_tokens_map.json
    _tok: Any = field(default=None, repr=False)

    @property
    def vocab(self) -> dict[str, int]:
        return self.data["model"]["vocab"]

    @property
    def merges(self) -> list[tuple[str, str]]:
        return parse_merges(self.data["model"].get("merges") or [], self.file)

    @property
    def added_tokens(self) -> list[dict]:
        return list(self.data.get("added_tokens") or [])

    @property
    def ignore_merges(self) -> bool:
        return bool(self.data["model"].get("ignore_merges", False))

    def size(self) -> int:
        """Number of ids: one past the largest id of the vocabulary and the added tokens."""
        ids = list(self.vocab.values()) + [int(t["id"]) for t in self.added_tokens]
        return max(ids) + 1

    def tokenizer(self):
        """The `tokenizers.Tokenizer` (built once)."""
        if self._tok is None:
            from tokenizers import Tokenizer

            try:
                self._tok = Tokenizer.from_str(json.dumps(self.data))
            except Exception as e:
                raise input_error(self.file, f"`tokenizers` cannot load it ({str(e)[:200]})",
                                  "re-save the tokenizer with save_pretrained") from None
        return self._tok

    def id_to_token(self) -> dict[int, str]:
        out = {i: t for t, i in self.vocab.items()}
        for t in self.added_tokens:
            out[int(t["id"])] = t["content"]
        return out


def _folder_configs(folder: Path) -> tuple[dict, dict]:
    config, special_map = {}, {}
    if (folder / CONFIG_FILE).is_file():
        config = _read_json(folder / CONFIG_FILE)
    if (folder / "special_tokens_map.json").is_file():
        special_map = _read_json(folder / "special_tokens_map.json")
    return config, special_map


def load_bytelevel(path: str | Path) -> ByteLevelTokenizer:
    """A byte-level BPE from a HF folder, a tokenizer.json or a tekken JSON; GraftError for anything else."""
    path = Path(path)
    if not path.exists():
        raise input_error(path, "not found", "check the path")
    if path.is_dir():
        file = path / HF_FILE
        if not file.is_file():
            raise input_error(path, f"folder has no {HF_FILE}", f"pass a tokenizer folder or file: {SUPPORTED}")
    else:
        file = path
    from common.gguf_vocab import is_gguf_file

    if is_gguf_file(file):
        raise input_error(file, "is a GGUF file: vocab-graft grows a tokenizer.json",
                          f"convert it once with `graft vocab convert {file} --out DIR` and pass DIR")
    data = _read_json(file)
    if is_tekken_data(data):
        tok, info = tekken_to_tokenizer(file)
        config, special_map = tekken_hf_config(info)
        return ByteLevelTokenizer(path, file, "tekken", json.loads(tok.to_str()), config, special_map, tok)
    if not isinstance(data, dict) or "model" not in data:
        raise input_error(file, "is neither a Hugging Face tokenizer.json nor a tekken file",
                          f"pass one of: {SUPPORTED}")
    why = bytelevel_problem(data)
    if why:
        raise input_error(file, f"is not a tokenizer vocab-graft can grow: {why}", f"pass one of: {SUPPORTED}")
    config, special_map = _folder_configs(path if path.is_dir() else path.parent) if (
        path.is_dir() or path.name == HF_FILE) else ({}, {})
    return ByteLevelTokenizer(path, file, HF_FILE, data, config, special_map)


def tokenizer_family(path: str | Path) -> str:
    """"sentencepiece" or "bytelevel" for a base tokenizer path; GraftError naming the file otherwise.

    A folder with tokenizer.model (with or without tokenizer.json) is SentencePiece, as before, and so is any
    file that is not .json (Mixtral ships `tokenizer.model.v1`).
    """
    p = Path(path)
    if not p.exists():
        raise input_error(p, "not found", "check the path")
    if p.is_dir():
        if (p / SPM_FILE).is_file():
            return "sentencepiece"
        if not (p / HF_FILE).is_file():
            raise input_error(p, f"folder has neither {SPM_FILE} nor {HF_FILE}", f"pass one of: {SUPPORTED}")
        load_bytelevel(p)  # raises for another kind of tokenizer.json
        return "bytelevel"
    if p.suffix in (".json", ".gguf"):
        load_bytelevel(p)  # a GGUF file: an error saying how to convert it
        return "bytelevel"
    return "sentencepiece"  # any other file: the SentencePiece loader names what is wrong with it


def looks_bytelevel(path: str | Path | None) -> bool:
    """Cheap guess from names only (no parsing), for config validation: a .json file, or a folder with
    tokenizer.json and no tokenizer.model."""
    if not path:
        return False
    p = Path(path)
    if p.is_dir():
        return (p / HF_FILE).is_file() and not (p / SPM_FILE).is_file()
    return p.suffix == ".json"


def write_hf_folder(out: Path, tokenizer_json: dict | str, config: dict, special_map: dict) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out` (an existing folder)."""
    from common.io import atomic_write_json, atomic_write_text

    text = tokenizer_json if isinstance(tokenizer_json, str) else json.dumps(tokenizer_json, ensure_ascii=False,
                                                                               indent=2)
    atomic_write_text(out / HF_FILE, text)
    atomic_write_json(out / CONFIG_FILE, config)
    atomic_write_json(out / "special_tokens_map.json", special_map)
    return [HF_FILE, CONFIG_FILE, "special_tokens_map.json"]


__all__ = ["ByteLevelTokenizer", "GraftError", "load_bytelevel", "tokenizer_family", "tekken_to_tokenizer",
           "tekken_hf_config", "to_bytelevel", "from_bytelevel", "token_text", "is_tekken_file", "looks_bytelevel",
           "write_hf_folder", "bpe_merges_from_ranks", "bytelevel_problem", "parse_merges"]
