"""The pieces of the old and new tokenizers, and how each new piece splits under the old tokenizer.

A tokenizer argument is a SentencePiece `.model` or a Hugging Face folder holding `tokenizer.model`
(what `graft vocab merge` writes); tokens that the folder's `tokenizer.json` adds after the SentencePiece
pieces (added tokens) are read too. A byte-level BPE (a folder or tokenizer.json without tokenizer.model, or
Mistral's tekken JSON) is read from its tokenizer.json: see `load_bytelevel_pieces` and
`ByteLevelSurfaceEncoder` (a new token's surface is its bytes; text is split by the old tokenizer without
BOS/EOS, partial characters by its BPE model alone).

Surface text of a new piece (what the model would have read before the vocabulary grew):
- a normal piece: its text with "▁" turned into a space;
- a byte piece `<0xNN>`: that single byte;
- an added token that is not special: its content;
- control/unknown/user-defined pieces and special added tokens: no surface text (they get the mean of all
  old rows). User-defined pieces are how SentencePiece (and `graft vocab merge`) store special tokens
  such as `<|im_start|>`, whose characters say nothing about their meaning.

The surface is encoded with a copy of the old SentencePiece model whose `add_dummy_prefix` and
`remove_extra_whitespaces` are switched off, and without BOS/EOS: a piece from the middle of a word
(`国`) must not average in "▁"; only a piece that itself starts with "▁" (`▁中国`) includes it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import input_error
from common.tokenizer_files import BYTE, CONTROL, HF_FILE, UNKNOWN, UNUSED, USER_DEFINED, load_model_proto

_BYTE_RE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
SPACE = "▁"

# Surface kinds
NORMAL, BYTES, SPECIAL = "normal", "byte", "special"


@dataclass
class TokenizerPieces:
    """Every id of a tokenizer: its piece string and kind ("normal", "byte" or "special")."""
    path: Path
    pieces: list[str]
    kinds: list[str]
    proto: Any = field(repr=False)            # sentencepiece ModelProto (None for a byte-level BPE)
    added: dict[int, str] = field(default_factory=dict)  # ids beyond the SentencePiece model / added tokens
    bytelevel: Any = field(default=None, repr=False)     # common.bytelevel.ByteLevelTokenizer

    def __len__(self) -> int:
        return len(self.pieces)

    def surface(self, i: int) -> str | bytes | None:
        """The text (str), bytes (a single byte piece, or a byte-level token) or None (special) of id `i`."""
        kind, piece = self.kinds[i], self.pieces[i]
        if kind == SPECIAL:
            return None
        if kind == BYTES:
            return bytes([int(_BYTE_RE.match(piece).group(1), 16)])
        if self.bytelevel is not None:
            from common.bytelevel import from_bytelevel

            return piece if i in self.added else from_bytelevel(piece)
        return piece if i in self.added else piece.replace(SPACE, " ")


def _added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    """{id: (content, special)} for the added tokens a HF folder declares (tokenizer_config + tokenizer.json)."""
    found: dict[int, tuple[str, bool]] = {}
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file():
        try:
            dec = json.loads(cfg.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        except json.JSONDecodeError as e:
            raise input_error(cfg, f"not valid JSON ({e.msg})", "re-save the tokenizer", line=e.lineno) from None
        for k, v in dec.items():
            found[int(k)] = (v["content"], bool(v.get("special", False)))
    tj = folder / HF_FILE
    if tj.is_file():
        try:
            data = json.loads(tj.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise input_error(tj, f"not valid JSON ({e.msg})", "re-save the tokenizer", line=e.lineno) from None
        for t in data.get("added_tokens") or []:
            found[int(t["id"])] = (t["content"], bool(t.get("special", False)))
    return found


def load_bytelevel_pieces(path: str | Path) -> TokenizerPieces:
    """The ids of a byte-level BPE (HF folder, tokenizer.json or tekken JSON): vocabulary tokens are "normal"
    (their surface is their bytes), added tokens are "special" when flagged so, else "normal" with their text."""
    from common.bytelevel import load_bytelevel

    path = Path(path)
    tok = load_bytelevel(path)
    n = tok.size()
    pieces: list[str | None] = [None] * n
    kinds = [NORMAL] * n
    for t, i in tok.vocab.items():
        pieces[i] = t
    added: dict[int, str] = {}
    for t in tok.added_tokens:
        i = int(t["id"])
        pieces[i] = t["content"]
        if t.get("special"):
            kinds[i] = SPECIAL
        elif tok.vocab.get(t["content"]) != i:
            added[i] = t["content"]
    missing = [i for i, p in enumerate(pieces) if p is None]
    if missing:
        raise input_error(tok.file, f"{len(missing)} ids between 0 and {n - 1} have no token (first {missing[0]})",
                          "re-save the tokenizer with save_pretrained (ids must be contiguous)")
    return TokenizerPieces(path, pieces, kinds, None, added, tok)  # type: ignore[arg-type]


def _is_bytelevel(path: Path) -> bool:
    return (path.is_dir() and not (path / "tokenizer.model").exists() and (path / HF_FILE).is_file()) or \
        (path.is_file() and path.suffix == ".json")


def load_pieces(path: str | Path) -> TokenizerPieces:
    """Read a tokenizer's pieces from a .model file or a HF folder with tokenizer.model; or from a byte-level BPE
    (a HF folder or tokenizer.json without tokenizer.model, or Mistral's tekken JSON)."""
    path = Path(path)
    if _is_bytelevel(path):
        return load_bytelevel_pieces(path)
    proto = load_model_proto(path)
    pieces, kinds = [], []
    for p in proto.pieces:
        pieces.append(p.piece)
        if p.type in (CONTROL, UNKNOWN, UNUSED, USER_DEFINED):
            kinds.append(SPECIAL)
        elif p.type == BYTE and _BYTE_RE.match(p.piece):
            kinds.append(BYTES)
        else:
            kinds.append(NORMAL)
    added: dict[int, str] = {}
    if path.is_dir():
        declared = _added_tokens(path)
        for i, (content, special) in declared.items():
            # e.g. a special token that `graft vocab merge` stored as a user-defined piece
            if i < len(pieces) and special:
                kinds[i] = SPECIAL
        extra = {i: v for i, v in declared.items() if i >= len(pieces)}
        for i in sorted(extra):
            if i != len(pieces):
                raise input_error(path / HF_FILE, f"added token ids are not contiguous after the "
                                  f"{len(proto.pieces)} SentencePiece pieces (id {i} follows {len(pieces) - 1})",
                                  "re-save the tokenizer with save_pretrained")
            content, special = extra[i]
            pieces.append(content)
            kinds.append(SPECIAL if special else NORMAL)
            added[i] = content
    return TokenizerPieces(path, pieces, kinds, proto, added)


class _Encoder:
    """Old ids for a new token's surface (unknown pieces dropped); [] means "no usable sub-pieces". A surface
    is text, or bytes (decoded when they are whole UTF-8 text, else split as bytes)."""

    def encode(self, surface: str | bytes | None) -> list[int]:
        if surface is None:
            return []
        if isinstance(surface, bytes):
            try:
                surface = surface.decode("utf-8")
            except UnicodeDecodeError:
                return self.encode_bytes(surface)
        return self.encode_text(surface)

    def encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_bytes(self, data: bytes) -> list[int]:
        raise NotImplementedError


class ByteLevelSurfaceEncoder(_Encoder):
    """Encodes a surface with an OLD byte-level BPE: text through the whole tokenizer without BOS/EOS (its
    normalizer, pre-tokenizer, added tokens and BPE); bytes that are not whole UTF-8 text (a new token holding
    part of a character) through its BPE model alone, on their byte-level string."""

    def __init__(self, old: TokenizerPieces):
        self.tok = old.bytelevel.tokenizer()

    def encode_text(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_bytes(self, data: bytes) -> list[int]:
        from common.bytelevel import to_bytelevel

        ids = [self.tok.token_to_id(t.value) for t in self.tok.model.tokenize(to_bytelevel(data))]
        return [i for i in ids if i is not None]


class SurfaceEncoder(_Encoder):
    """Encodes surface text with the OLD tokenizer: no BOS/EOS, no dummy-prefix space, spaces kept."""

    def __init__(self, old: TokenizerPieces):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.CopyFrom(old.proto)
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(proto.SerializeToString())
        self.unk_id = self.sp.unk_id()
        self.byte_ids = {bytes([int(_BYTE_RE.match(p).group(1), 16)]): i
                         for i, (p, k) in enumerate(zip(old.pieces, old.kinds)) if k == BYTES}
        # Added (non-special) tokens of the old tokenizer are matched literally, like HF does.
        self.added = {p: i for i, p in old.added.items() if old.kinds[i] != SPECIAL}

    def encode_text(self, text: str) -> list[int]:
        if text in self.added:
            return [self.added[text]]
        return [i for i in self.sp.encode(text) if i != self.unk_id]

    def encode_bytes(self, data: bytes) -> list[int]:
        return [self.byte_ids[b] for b in (data[i:i + 1] for i in range(len(data))) if b in self.byte_ids]


def surface_encoder(old: TokenizerPieces) -> SurfaceEncoder | ByteLevelSurfaceEncoder:
    """The encoder for `old`'s kind of tokenizer."""
    return ByteLevelSurfaceEncoder(old) if old.bytelevel is not None else SurfaceEncoder(old)


def check_extends(old: TokenizerPieces, new: TokenizerPieces) -> None:
    """Raise unless `new` starts with exactly `old`'s pieces (same ids, same strings) and adds some."""
    if len(new) < len(old):
        raise input_error(new.path, f"the new tokenizer has {len(new)} pieces, fewer than the old one's {len(old)}",
                          "pass the grown tokenizer as --new-tokenizer and the model's own as --old-tokenizer")
    diff = [i for i in range(len(old)) if old.pieces[i] != new.pieces[i]]
    if diff:
        i = diff[0]
        raise input_error(new.path, f"the new tokenizer does not extend the old one {old.path}: {len(diff)} of the "
                          f"first {len(old)} pieces differ, first at id {i} (old {old.pieces[i]!r}, new "
                          f"{new.pieces[i]!r})", "build the new tokenizer with `graft vocab merge` from this "
                          "base tokenizer, so that old ids keep their pieces")
