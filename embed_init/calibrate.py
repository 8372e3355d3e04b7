"""`--output-method calibrated`: the pieces' mean lm_head rows, each first-piece group shifted down by a
log-offset sized on a small calibration sample run through the base model once.

Why: with mean rows, the k new tokens whose surface starts with old piece f all score about as high as f, so
together they take up to k times f's probability, also where f is unlikely (English text, for Chinese
pieces). An lm_head without a bias cannot subtract a constant from a logit, but it can move a row along a
direction r on which the final hidden states all project to about 1 (h . r ~= 1; ridge least squares over
the calibration positions): the row w - b r then scores about b lower at every position.

For each group g of new ids sharing first piece f, on calibration text tokenized by the OLD tokenizer and
scored by the base model (old ids only, Z_old their normaliser):
    M_g = sum over positions t and j in g of exp(h_t . w_j) / Z_old(t)   (mass the group would take)
    P_f = sum over positions t of exp(h_t . w_f) / Z_old(t)             (f's own mass)
    b_g = max(0, ln(M_g / (share * P_f)))
so, to the extent that h_t . r = 1, the group takes `share` times its first piece's mass on that text. A
group whose rows average Chinese characters ends up with as much probability as the characters it starts
with had, and as little English text as those characters had. Groups already below are left as mean rows.
Cost: one forward pass of the base model over --calibration-tokens tokens, then matrix products of the
(tokens x hidden) hidden states with the old and new rows, streamed in chunks of rows.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

_ROWS = 4096  # rows per chunk in the hidden-state products
RIDGE = 1e-3  # ridge of the direction fit, relative to the mean squared hidden state
MAX_OFFSET = 50.0  # a group whose first piece never occurs gets at most this offset


def calibration_windows(tok, files: list[str], max_tokens: int, max_len: int) -> list[list[int]]:
    """Token windows (BOS + a document's tokens by `tok`, cut every `max_len`) from each file in turn, an equal
    share of `max_tokens` per file (so a small English file next to a large Chinese one still counts)."""
    from common.errors import input_error
    from corpus.readers import iter_texts

    bos = tok.token_to_id("<s>")
    windows: list[list[int]] = []
    budget = -(-max_tokens // len(files))
    for path in files:
        n = 0
        for rec in iter_texts([path]):
            ids = ([bos] if bos is not None else []) + tok.encode(rec.text, add_special_tokens=False).ids
            for s in range(0, len(ids) - 1, max_len):
                w = ids[s:s + max_len][:budget - n]
                windows.append(w)
                n += len(w)
                if n >= budget:
                    break
            if n >= budget:
                break
        if n == 0:
            raise input_error(path, "no calibration text", "pass non-empty text files as --calibration")
    return windows


def calibration_hidden(model_dir: str | Path, tokenizer_path: str | Path, files: list[str], max_tokens: int,
                       max_len: int = 256):
    """Final hidden states (the input of lm_head), fp32 (positions x hidden), of the base model over about
    `max_tokens` tokens of `files` (calibration_windows; OLD tokenizer). The model is loaded once, the way the
    eval stage loads one (continual.load: full precision where it fits, GPUs with a device map, else NF4;
    never a whole model that does not fit), and freed."""
    import torch

    from common.tokenizer_files import load_fast_tokenizer
    from continual.load import load_model, plan_load

    windows = calibration_windows(load_fast_tokenizer(tokenizer_path), files, max_tokens, max_len)
    plan = plan_load(model_dir, fix="run embed init where the model fits (a GPU node), or leave out --calibration "
                                    "(lm_head rows by the mean rule)")  # embed init has no `load` setting to force
    print(f"  calibration: base model loaded {plan.describe()} ({plan.rule})")
    model = load_model(plan)
    model.eval()
    decoder = model.get_decoder()  # the transformer without lm_head: its last_hidden_state is lm_head's input
    device = model.get_input_embeddings().weight.device  # where a device map put the first layer
    got = []
    with torch.no_grad():
        for w in windows:
            got.append(decoder(input_ids=torch.tensor([w], device=device), use_cache=False)
                       .last_hidden_state[0].float().cpu())
    del model, decoder
    return torch.cat(got)


def fit_direction(hidden):
    """r with hidden @ r ~= 1 at every position (ridge least squares, in float64)."""
    import torch

    h = hidden.double()
    gram = h.T @ h
    ridge = RIDGE * torch.trace(gram) / gram.shape[0]
    return torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), h.sum(0)).float()


def old_logsumexp(hidden, old):
    """Per position: log of the sum of exp(old logits), streamed over chunks of old rows."""
    import torch

    lse = torch.full((hidden.shape[0],), -math.inf)
    for s in range(0, old.shape[0], _ROWS):
        lse = torch.logaddexp(lse, (hidden @ old[s:s + _ROWS].float().T).logsumexp(-1))
    return lse


def calibrated_offsets(new, n_old: int, n_new: int, hidden, sources: list[list[int]],
                       share: float) -> tuple[Any, dict[str, Any]]:
    """Per new id n_old + k: the offset b of its first-piece group (0 for ids without pieces), from the rows
    of `new` (old rows first, new rows before the shift, any dtype; read in chunks), and a summary."""
    import torch

    old = new[:n_old]
    lse = old_logsumexp(hidden, old)
    groups: dict[int, list[int]] = defaultdict(list)
    for k, ids in enumerate(sources):
        if ids:
            groups[ids[0]].append(k)
    firsts = sorted(groups)
    p_first = torch.zeros(len(firsts), dtype=torch.float64)
    for s in range(0, len(firsts), _ROWS):
        idx = torch.tensor(firsts[s:s + _ROWS], dtype=torch.long)
        p_first[s:s + len(idx)] = (hidden @ old[idx].float().T - lse[:, None]).double().exp().sum(0)
    added = n_new - n_old
    m_new = torch.zeros(added, dtype=torch.float64)
    for s in range(0, added, _ROWS):
        rows = new[n_old + s:n_old + min(added, s + _ROWS)].float()
        m_new[s:s + len(rows)] = (hidden @ rows.T - lse[:, None]).double().exp().sum(0)
    offsets = torch.zeros(added)
    for f, p in zip(firsts, p_first.tolist()):
        ks = torch.tensor(groups[f], dtype=torch.long)
        m = float(m_new[ks].sum())
        if m > share * p:
            offsets[ks] = math.log(m / (share * p)) if p > 0 else MAX_OFFSET
    n = hidden.shape[0]
    shifted = offsets[offsets > 0]
    summary = {"positions": n, "share": share, "groups": len(firsts),
               "groups_shifted": sum(1 for f in firsts if offsets[groups[f][0]] > 0),
               "offset_median": float(offsets.median()) if added else 0.0,
               "offset_max": float(offsets.max()) if added else 0.0,
               "offset_median_of_shifted": float(shifted.median()) if len(shifted) else 0.0,
               "new_id_mass_before": float(m_new.sum()) / n}
    return offsets.clamp(max=MAX_OFFSET), summary


def apply_calibration(new, n_old: int, n_new: int, hidden, sources: list[list[int]], share: float) -> dict[str, Any]:
    """Move the new rows of `new` (in place, chunk by chunk, computed in fp32) by -b r: b per first-piece group
    (calibrated_offsets), r = fit_direction(hidden). Returns the summary for the manifest."""
    import torch

    r = fit_direction(hidden)
    offsets, summary = calibrated_offsets(new, n_old, n_new, hidden, sources, share)
    for s in range(0, n_new - n_old, _ROWS):
        block = new[n_old + s:n_old + min(n_new - n_old, s + _ROWS) ].float()
        block -= offsets[s:s + len(block), None] * r[None, :]
        new[n_old + s:n_old + s + len(block)] = block.to(new.dtype)
    proj = (hidden @ r).float()
    q = [float(v) for v in torch.quantile(proj, torch.tensor([0.05, 0.5, 0.95]))]
    summary["direction_fit"] = {"q05": q[0], "median": q[1], "q95": q[2]}  # h . r over the positions (want ~1)
    return summary
