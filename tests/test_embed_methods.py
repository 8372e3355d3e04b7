"""graft embed init's row methods for embed_tokens (--method) and lm_head (--output-method), and padding rows.

Every new row is recomputed here from the original checkpoint's rows, with the pieces taken from the Hugging
Face `tokenizers` BPE (test_embed_init.expected_sources, not the stage's SentencePiece encoder) and each
method's formula written out again. The probability claims (padding rows take no mass; prefix-share keeps
the new tokens that share a first piece below that piece's probability) are measured on real held-out text
with a small model trained here for a few seconds.
"""
from __future__ import annotations

import math

import pytest
import torch

from common.checkpoint import open_checkpoint
from common.errors import GraftError
from common.io import read_manifest
from demo.tiny import save_tiny_llama_tied
from embed_init.config import EmbedInitConfig
from embed_init.grow import PAD_SCALE, grow_embeddings, write_tokenizer
from test_embed_init import _extend_model, expected_sources
from workflows.cli import main as graft_main

N_OLD = 32000
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def work(tmp_path_factory, base_model_path, news_lines):
    from demo.tiny import save_tiny_mixtral
    from common.tokenizer_files import load_model_proto

    d = tmp_path_factory.mktemp("methods")
    new_model = _extend_model(base_model_path, d / "new.model", news_lines)
    pieces = [p.piece for p in load_model_proto(new_model).pieces]
    return {"dir": d, "new_model": new_model, "pieces": pieces,
            "sources": expected_sources(base_model_path, pieces, N_OLD),
            "mixtral": save_tiny_mixtral(d / "mixtral", max_shard_size="4MB")}


def _rows(path, name):
    return open_checkpoint(path).read_tensor(name)


def _expected(old: torch.Tensor, sources, method: str, output: bool, a: float = 0.5) -> torch.Tensor:
    """The new rows written out per new id, in float64, from the old rows (independent of the stage's code)."""
    old64 = old.double()
    mean_all = old64.mean(0)
    first_counts: dict[int, int] = {}
    for ids in sources:
        if ids:
            first_counts[ids[0]] = first_counts.get(ids[0], 0) + 1
    rows = []
    for ids in sources:
        if not ids:
            rows.append(mean_all)
            continue
        n = len(ids)
        if method == "mean":
            row = sum(old64[i] for i in ids) / n
        elif method == "first-last":
            row = old64[ids[0]] if output else old64[ids[-1]]
        elif method == "weighted-mean":
            w = [n - k for k in range(n)] if output else [k + 1 for k in range(n)]
            row = sum(wk * old64[i] for wk, i in zip(w, ids)) / sum(w)
        elif method == "interpolation":
            row = (1 - a) * mean_all + a * sum(old64[i] for i in ids) / n
        elif method == "prefix-share":
            t = min(1.0, math.log(first_counts[ids[0]] + 1) / (0.5 * math.log(N_OLD)))
            row = (1 - t) * old64[ids[0]] + t * mean_all
        else:
            raise AssertionError(method)
        rows.append(row)
    return torch.stack(rows)


def _assert_rows(src, out, name, sources, method, output, a=0.5):
    old, new = _rows(src, name), _rows(out, name)
    assert torch.equal(new[:N_OLD].view(torch.int32), old.view(torch.int32))  # old rows bit-identical
    want = _expected(old, sources, method, output, a)
    torch.testing.assert_close(new[N_OLD:N_OLD + len(sources)].double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,output_method", [
    ("mean", "first-last"), ("first-last", "prefix-share"), ("weighted-mean", "weighted-mean"),
    ("interpolation", "interpolation"), ("mean", "mean")])
def test_rows_recomputed_for_each_method(work, base_model_path, tmp_path, method, output_method):
    src = work["mixtral"]
    out = grow_embeddings(EmbedInitConfig(model=str(src), old_tokenizer=str(base_model_path),
                                          new_tokenizer=str(work["new_model"]), out=str(tmp_path / "g"),
                                          method=method, output_method=output_method, interpolation=0.3,
                                          progress=False))
    _assert_rows(src, out, EMBED, work["sources"], method, False, 0.3)
    _assert_rows(src, out, HEAD, work["sources"], output_method, True, 0.3)
    m = read_manifest(out)
    assert (m["method"], m["output_method"]) == (method, output_method)
    if output_method == "prefix-share":
        firsts = [ids[0] for ids in work["sources"] if ids]
        assert m["prefix_share"]["first_pieces"] == len(set(firsts))
        assert m["prefix_share"]["largest_group"] == max(firsts.count(f) for f in set(firsts))
    else:
        assert m["prefix_share"] is None


def test_default_output_method_and_cli(work, base_model_path, tmp_path):
    """No --output-method and no --calibration text: lm_head follows --method (mean); the flags reach the config.
    (With --calibration text the default is calibrated: test_calibrated_rows_recomputed_from_the_base_models_logits.)"""
    default = "mean"
    src = work["mixtral"]
    out = tmp_path / "d"
    assert graft_main(["embed", "init", "--model", str(src), "--old-tokenizer", str(base_model_path),
                       "--new-tokenizer", str(work["new_model"]), "--out", str(out), "--no-progress"]) == 0
    m = read_manifest(out)
    assert (m["method"], m["output_method"]) == ("mean", default)
    _assert_rows(src, out, EMBED, work["sources"], "mean", False)
    _assert_rows(src, out, HEAD, work["sources"], default, True)
    out2 = tmp_path / "c"
    assert graft_main(["embed", "init", "--model", str(src), "--old-tokenizer", str(base_model_path),
                       "--new-tokenizer", str(work["new_model"]), "--out", str(out2), "--no-progress",
                       "--method", "first-last", "--output-method", "interpolation", "--interpolation", "0.25"]) == 0
    _assert_rows(src, out2, EMBED, work["sources"], "first-last", False)
    _assert_rows(src, out2, HEAD, work["sources"], "interpolation", True, 0.25)


def test_errors_name_the_option(work, base_model_path, tmp_path):
    cfg = dict(model=str(work["mixtral"]), old_tokenizer=str(base_model_path), new_tokenizer=str(work["new_model"]),
               out=str(tmp_path / "o"), progress=False)
    with pytest.raises(GraftError, match=r"--method 'prefix-share' sets lm_head rows only .*Fix: pass it as "
                                         r"--output-method prefix-share"):
        EmbedInitConfig(method="prefix-share", **cfg)
    with pytest.raises(GraftError, match=r"\(--output-method\) = 'median' is not one of mean, hf-mean, random, .*"
                                         r"prefix-share, calibrated. Fix"):
        EmbedInitConfig(output_method="median", **cfg)
    with pytest.raises(GraftError, match=r"interpolation.*must be in \[0, 1\]"):
        EmbedInitConfig(method="interpolation", interpolation=1.5, **cfg)
    tied = save_tiny_llama_tied(tmp_path / "tied")
    with pytest.raises(GraftError, match=r"config.json: --calibration is given, but this model ties lm_head to "
                                         r"embed_tokens .*Fix: leave --calibration out"):
        grow_embeddings(EmbedInitConfig(**{**cfg, "model": str(tied)},
                                        calibration=[_write_jsonl(tmp_path / "cal.jsonl", ["你好"])]))
    with pytest.raises(GraftError, match=r"config.json: --output-method prefix-share differs from --method mean, but "
                                         r"this model ties lm_head to embed_tokens \(one matrix\)\. Fix: leave "
                                         r"--output-method empty"):
        grow_embeddings(EmbedInitConfig(**{**cfg, "model": str(tied)}, output_method="prefix-share"))
    assert not (tmp_path / "o").exists()
    # A tied model with no --output-method: the one matrix gets --method, padding rows as an output matrix.
    out = grow_embeddings(EmbedInitConfig(**{**cfg, "model": str(tied)}, method="first-last", pad_to_multiple_of=64))
    m = read_manifest(out)
    assert m["output_method"] == "first-last" and m["tied"] is True
    old, new = _rows(tied, EMBED), _rows(out, EMBED)
    n_new = len(work["pieces"])
    torch.testing.assert_close(new[N_OLD:n_new].double(), _expected(old, work["sources"], "first-last", False),
                               rtol=1e-5, atol=1e-6)
    assert new.shape[0] > n_new
    torch.testing.assert_close(new[n_new:].double(), (PAD_SCALE * old.double().mean(0)).expand(new.shape[0] - n_new, -1),
                               rtol=1e-5, atol=1e-6)


# ------------------------------------------------- probability on real text (a small model trained here)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_model_path, news_lines, english_paragraphs, work):
    """A tiny untied Llama trained ~20 s on real zh + en text with Mixtral's tokenizer, and texts held out."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("trained")
    tok_dir = d / "tok"
    tok_dir.mkdir()
    write_tokenizer(base_model_path, tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=N_OLD, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    zh, en = list(news_lines[:3000:3]), list(english_paragraphs[:600:3])
    stream = [t for text in zh + en for t in tok.encode(text)]
    seq = 64
    blocks = torch.tensor([stream[i:i + seq] for i in range(0, len(stream) - seq, seq)])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    torch.set_num_threads(2)
    for _ in range(150):
        x = blocks[torch.randint(len(blocks), (8,), generator=g)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    src = d / "base"
    model.save_pretrained(src, safe_serialization=True)
    for f in tok_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    held_zh = [t for t in news_lines[1:3000:3] if 30 <= len(t) <= 200][:40]
    held_en = [t for t in english_paragraphs[1:600:3] if 80 <= len(t) <= 800][:15]
    return {"src": src, "loss": float(loss.detach()), "zh": held_zh, "en": held_en}


def _logits(model_dir, texts):
    """Logits over the whole grown vocabulary at every position of every text (BOS + text), float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return torch.cat([model(torch.tensor([tok.encode(t)])).logits[0].double() for t in texts])


def _probs(model_dir, texts):
    """Softmax over the whole grown vocabulary at every position of every text (BOS + text)."""
    return _logits(model_dir, texts).softmax(-1)


def test_padding_rows_take_no_probability_on_real_text(work, base_model_path, trained, tmp_path):
    assert trained["loss"] < 7.0  # it learned something (a uniform guess is ln 32000 = 10.4)
    out = grow_embeddings(EmbedInitConfig(model=str(trained["src"]), old_tokenizer=str(base_model_path),
                                          new_tokenizer=str(work["new_model"]), out=str(tmp_path / "p"),
                                          pad_to_multiple_of=256, progress=False))
    assert read_manifest(out)["counts"]["padding_rows"] >= 100
    n_new = len(work["pieces"])
    rows = _rows(out, HEAD).shape[0]
    assert rows - n_new >= 100  # many padding rows
    head = _rows(out, HEAD)
    torch.testing.assert_close(head[n_new:].double(), (head[:N_OLD].double().mean(0) * PAD_SCALE).expand(
        rows - n_new, -1), rtol=1e-6, atol=1e-7)
    for texts in (trained["zh"], trained["en"]):
        logits = _logits(out, texts)  # the grown checkpoint, loaded and run as a user would
        p = logits.softmax(-1)
        pad = p[:, n_new:].sum(-1)
        assert pad.max().item() < 1e-6, pad.max().item()   # at every position, all padding rows together
        # Not a guarantee but what it rests on, measured here: the mean old logit is negative at every position
        # (a padding row's logit is PAD_SCALE times it). And the scale matters: rows equal to the mean row (the
        # earlier padding, logit = mean old logit) would take more than the bound somewhere.
        mean_logit = logits[:, :N_OLD].mean(-1)
        torch.testing.assert_close(logits[:, n_new], PAD_SCALE * mean_logit, rtol=1e-4, atol=1e-4)
        assert mean_logit.max().item() < 0
        unscaled = (rows - n_new) * (mean_logit - logits.logsumexp(-1)).exp()
        assert unscaled.max().item() > 1e-6, unscaled.max().item()


def test_prefix_share_keeps_groups_below_their_first_piece(work, base_model_path, trained, tmp_path):
    """Where a first piece f has probability >= 1/sqrt(V) among the old ids, the k new ids starting with f
    together take at most k/(k+1) of f's probability (each row: (1-t) w_f + t w_mean, t = ln(k+1)/(0.5 ln V))."""
    out = grow_embeddings(EmbedInitConfig(model=str(trained["src"]), old_tokenizer=str(base_model_path),
                                          new_tokenizer=str(work["new_model"]), out=str(tmp_path / "s"),
                                          output_method="prefix-share", progress=False))
    groups: dict[int, list[int]] = {}
    for k, ids in enumerate(work["sources"]):
        if ids:
            groups.setdefault(ids[0], []).append(N_OLD + k)
    p = _probs(out, trained["zh"] + trained["en"])
    old_total = p[:, :N_OLD].sum(-1, keepdim=True)
    checked = 0
    for f, members in groups.items():
        pf_old = p[:, f] / old_total[:, 0]
        where = pf_old >= N_OLD ** -0.5
        if where.any():
            k = len(members)
            share = p[where][:, members].sum(-1)
            assert (share <= p[where, f] * k / (k + 1) * (1 + 1e-9)).all()
            checked += int(where.sum())
    assert checked > 50  # the bound was exercised at many positions


def _write_jsonl(path, texts):
    import json

    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return str(path)


def test_calibrated_rows_recomputed_from_the_base_models_logits(work, base_model_path, trained, news_lines,
                                                                 english_paragraphs, tmp_path):
    """`calibrated`: mean rows minus b_g r. Recomputed here from the base model's own logits (not h @ W): the
    old ids' log-normaliser and f's probability from the logits, a mean row's logit as the mean of its pieces'
    logits; r from the hidden states the lm_head receives (a hook), b_g = max(0, ln(M_g / (share P_f)))."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cal = [_write_jsonl(tmp_path / "zh.jsonl", news_lines[3001:3100]),
           _write_jsonl(tmp_path / "en.jsonl", english_paragraphs[601:640])]
    tokens, share = 600, 0.5
    out = grow_embeddings(EmbedInitConfig(model=str(trained["src"]), old_tokenizer=str(trained["src"]),
                                          new_tokenizer=str(work["new_model"]), out=str(tmp_path / "c"),
                                          calibration=cal, calibration_tokens=tokens,  # the default: calibrated
                                          calibration_share=share, progress=False))
    # The calibration windows, rebuilt with the HF tokenizer: per file 300 tokens of BOS + document, cut at 256.
    tok = AutoTokenizer.from_pretrained(trained["src"])
    windows = []
    for path, texts in zip(cal, (news_lines[3001:3100], english_paragraphs[601:640])):
        left = tokens // 2
        for t in texts:
            ids = tok.encode(t)
            assert ids[0] == 1
            for s in range(0, len(ids) - 1, 256):
                w = ids[s:s + 256][:left]
                windows.append(w)
                left -= len(w)
                if not left:
                    break
            if not left:
                break
    model = AutoModelForCausalLM.from_pretrained(trained["src"]).eval()
    hs, logits = [], []
    hook = model.lm_head.register_forward_pre_hook(lambda m, a: hs.append(a[0][0].double()))
    with torch.no_grad():
        for w in windows:
            logits.append(model(torch.tensor([w])).logits[0].double())
    hook.remove()
    h, lg = torch.cat(hs), torch.cat(logits)
    assert h.shape[0] == tokens
    logp = lg - lg.logsumexp(-1, keepdim=True)
    r = torch.linalg.solve(h.T @ h + 1e-3 * (h * h).sum() / h.shape[1] * torch.eye(h.shape[1]), h.sum(0))
    groups: dict[int, list[int]] = {}
    for k, ids in enumerate(work["sources"]):
        if ids:
            groups.setdefault(ids[0], []).append(k)
    offsets = torch.zeros(len(work["sources"]), dtype=torch.float64)
    for f, ks in groups.items():
        m = sum(logp[:, work["sources"][k]].mean(1).exp().sum() for k in ks)  # mean row's logit: mean of pieces'
        p = logp[:, f].exp().sum()
        offsets[ks] = max(0.0, math.log(m / (share * p)))
    assert (offsets > 0).sum() > 10 and (offsets == 0).sum() > 0  # both cases occur
    old = _rows(trained["src"], HEAD)
    want = _expected(old, work["sources"], "mean", True) - offsets[:, None] * r[None, :]
    new = _rows(out, HEAD)
    assert torch.equal(new[:N_OLD].view(torch.int32), old.view(torch.int32))
    torch.testing.assert_close(new[N_OLD:].double(), want, rtol=1e-4, atol=1e-5)
    _assert_rows(trained["src"], out, EMBED, work["sources"], "mean", False)
    m = read_manifest(out)
    assert m["output_method"] == "calibrated" and m["calibration"]["positions"] == tokens
    assert m["calibration"]["groups_shifted"] == len({f for f, ks in groups.items() if offsets[ks[0]] > 0})
    # What it is for: held-out English (tokenized alike by both tokenizers) loses less probability to new ids.
    mean_out = grow_embeddings(EmbedInitConfig(model=str(trained["src"]), old_tokenizer=str(trained["src"]),
                                               new_tokenizer=str(work["new_model"]), out=str(tmp_path / "m"),
                                               progress=False))
    mass = {name: _probs(d, trained["en"])[:, N_OLD:].sum(-1).mean().item() for name, d in
            (("calibrated", out), ("mean", mean_out))}
    assert mass["calibrated"] < 0.8 * mass["mean"], mass  # measured: 0.019 vs 0.031


def test_calibrated_needs_calibration_text(work, base_model_path, tmp_path):
    with pytest.raises(GraftError, match=r"--output-method calibrated needs text to calibrate on\. Fix: pass "
                                         r"--calibration FILE"):
        EmbedInitConfig(model="m", old_tokenizer="a", new_tokenizer="b", out=str(tmp_path / "o"),
                        output_method="calibrated")


def test_calibration_loads_the_base_to_fit_the_machine(trained, news_lines, tmp_path, monkeypatch):
    """The calibration hidden states come from the base loaded as the eval stage loads it (continual.load): NF4
    when full precision does not fit, never a full-precision from_pretrained; an error naming embed init's own
    fix when nothing fits, before any weights are read."""
    import bitsandbytes as bnb
    import transformers

    import continual.load as L
    from embed_init.calibrate import calibration_hidden

    cal = [_write_jsonl(tmp_path / "zh.jsonl", news_lines[3001:3040])]
    src = str(trained["src"])
    full = calibration_hidden(src, src, cal, max_tokens=200)
    nf4_need = L.plan_load(src, load="nf4").need["nf4"]
    monkeypatch.setattr(L, "free_gpu_memory", lambda: [])
    monkeypatch.setattr(L, "available_ram", lambda: 2 * nf4_need + 2)  # nf4 fits the half-of-RAM rule, fp32 not
    real_load, quantized = transformers.AutoModelForCausalLM.from_pretrained, []

    def only_quantized(*a, **kw):
        assert "quantization_config" in kw, "full-precision from_pretrained called"
        model = real_load(*a, **kw)
        quantized.append(sum(isinstance(x, bnb.nn.Linear4bit) for x in model.modules()))
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", only_quantized)
    nf4 = calibration_hidden(src, src, cal, max_tokens=200)
    assert quantized and quantized[0] > 0
    assert nf4.shape == full.shape == (200, full.shape[1])
    assert 0 < (nf4 - full).norm() < 0.5 * full.norm()  # the same positions, through 4-bit weights
    monkeypatch.setattr(L, "available_ram", lambda: 1000)
    with pytest.raises(GraftError, match=r"does not fit this machine .*Fix: run embed init where the model fits "
                                         r"\(a GPU node\), or leave out --calibration"):
        calibration_hidden(src, src, cal, max_tokens=200)
