"""Open tokenizer files the same way in every stage.

- `load_sentencepiece(path)`: a SentencePiece `.model`, or a folder holding `tokenizer.model`.
- `load_model_proto(path)`: the same file as a `ModelProto` (pieces, scores, types, trainer/normalizer specs).
- `load_fast_tokenizer(path)`: a `tokenizers.Tokenizer` from a Hugging Face folder (`tokenizer.json`),
  a `tokenizer.json` file, Mistral's tekken JSON (converted by common/bytelevel.py), or a SentencePiece
  BPE `.model` converted with `sentencepiece_to_fast`, which is exactly the conversion `graft vocab merge`
  writes into `tokenizer.json`.

The conversion follows transformers 4.57's `LlamaConverter` in its legacy mode (the mode of Mixtral's
own `tokenizer.json`): the normalizer prepends "▁" and maps " " to "▁", the BPE model has byte fallback,
and merges are generated from piece scores. Legacy mode is the one that agrees with SentencePiece's
`add_dummy_prefix` on text that starts with spaces (non-legacy `Metaspace` skips the prefix there, and
its decoder then drops a real space). Encode with `add_special_tokens=False` to compare with SentencePiece.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from common.errors import GraftError, input_error

# Every file a Hugging Face tokenizer folder may hold (SentencePiece and byte-level BPE): copied together, and
# never taken from a model folder when another tokenizer is written beside its weights.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # prompt format, not vocabulary: carried with the model
SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"
# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


def _model_file(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        candidate = path / SPM_FILE
        if not candidate.is_file():
            raise input_error(path, f"folder has no {SPM_FILE} (not a SentencePiece tokenizer)",
                              "pass a SentencePiece .model file, or a Hugging Face folder that contains "
                              f"{SPM_FILE} (e.g. one written by `graft vocab merge`)")
        return candidate
    if not path.exists():
        raise input_error(path, "file not found", "check the path")
    return path


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError:
        raise input_error(path, "permission denied", "make the file readable (chmod +r) or copy it") from None
    except OSError as e:
        raise input_error(path, f"cannot read ({e.strerror})", "check that the file is readable") from None


def load_model_proto(path: str | Path) -> Any:
    """Parse a SentencePiece model (file or folder with tokenizer.model) into a ModelProto."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    file = _model_file(path)
    data = _read_bytes(file)
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception:
        proto = None
    if proto is None or len(proto.pieces) == 0:
        raise input_error(file, "not a SentencePiece model (the file is corrupt, empty, or another format)",
                          "pass a .model file written by SentencePiece (spm_train / `graft vocab train`); "
                          "re-download or re-train it if it was truncated")
    return proto


def load_sentencepiece(path: str | Path) -> Any:
    """A `sentencepiece.SentencePieceProcessor` for a .model file or a folder with tokenizer.model."""
    import sentencepiece as spm

    file = _model_file(path)
    proto = load_model_proto(file)
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto.SerializeToString())
    except Exception as e:
        raise input_error(file, f"SentencePiece cannot load this model ({e})",
                          "re-train or re-download the model") from None
    return sp


def require_bpe(proto: Any, path: str | Path,
                fix: str = "train the vocabulary with model_type=bpe (what `graft vocab train` does)") -> None:
    """Raise a GraftError unless `proto` is a BPE model (the only kind vocab-graft merges and converts)."""
    kind = proto.trainer_spec.model_type
    if kind != 2:
        raise input_error(path, f"is a SentencePiece {MODEL_TYPES.get(kind, kind)} model, not BPE", fix)


def generate_merges(pieces: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """BPE merges from scored pieces, as transformers' `generate_merges` does with scores.

    Every split of a piece into two pieces that both exist is a merge, ranked by the piece's score
    (higher first), then longer left part, then longer right part; ties keep vocabulary-id order.
    """
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    merges = []
    for piece, score in pieces:
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def sentencepiece_to_fast(proto: Any, path: str | Path = "<model>", specials: Iterable[str] = ()) -> Any:
    """Convert a SentencePiece BPE ModelProto to a `tokenizers.Tokenizer` (Llama legacy conversion).

    Control pieces and the USER_DEFINED pieces named in `specials` become special added tokens;
    other USER_DEFINED pieces become non-special added tokens (as transformers converts them).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    require_bpe(proto, path)
    specials = set(specials)
    spec = proto.trainer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    tok = Tokenizer(BPE(vocab, generate_merges(pieces), unk_token=spec.unk_piece, fuse_unk=True,
                        byte_fallback=spec.byte_fallback, dropout=None))
    tok.add_tokens([AddedToken(p.piece, normalized=False, special=p.type == CONTROL or p.piece in specials)
                    for p in proto.pieces if p.type in (CONTROL, USER_DEFINED)])
    norm = [normalizers.Replace(pattern=" ", content="▁")]
    if proto.normalizer_spec.add_dummy_prefix:
        norm.insert(0, normalizers.Prepend(prepend="▁"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    if spec.bos_id >= 0:
        bos = proto.pieces[spec.bos_id].piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, spec.bos_id)])
    return tok


def load_fast_tokenizer(path: str | Path) -> Any:
    """A `tokenizers.Tokenizer` from a HF folder, a tokenizer.json, or a SentencePiece BPE .model."""
    from tokenizers import Tokenizer

    path = Path(path)
    if path.is_dir():
        if (path / HF_FILE).is_file():
            path = path / HF_FILE
        elif not (path / SPM_FILE).is_file():
            raise input_error(path, f"folder has neither {HF_FILE} nor {SPM_FILE}",
                              "pass a Hugging Face tokenizer folder, a tokenizer.json, or a SentencePiece .model")
    if not path.exists():
        raise input_error(path, "file not found", "check the path")
    if path.is_file() and path.suffix == ".json":
        data = _read_bytes(path)  # read once: its errors name the file
        if b'"token_bytes"' in data[:65536] and b'"config"' in data[:65536]:  # Mistral's tekken file
            from common.bytelevel import tekken_to_tokenizer

            return tekken_to_tokenizer(path)[0]
        try:
            return Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:
            raise input_error(path, f"not a Hugging Face tokenizer.json ({str(e)[:200]})",
                              "re-export it with `tokenizer.save_pretrained(DIR)` or `graft vocab merge`") from None
    proto = load_model_proto(path)
    return sentencepiece_to_fast(proto, _model_file(path))


def is_sentencepiece(path: str | Path) -> bool:
    """True when `path` is (or is a folder with) a parseable SentencePiece model."""
    try:
        load_model_proto(path)
        return True
    except GraftError:
        return False
