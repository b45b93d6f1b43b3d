"""Fused decoding (docs/method.md §6): Pilot + Copilot with KV caches; greedy, sampling, beam
search.

Each decoding step: the Pilot gives z_i (and, through the tap, the pooled state h_i); the Copilot,
fed its own previous prediction f_{i-1}, gives f_i; the fused distribution is
p~_i = p_hat_i + lambda f_i (fusion='probs', clamped at 0 and renormalised) or
softmax(z_i + lambda f_i) (fusion='logits'). Greedy takes its argmax, sampling draws from it
(temperature, top-k, top-p), beam search ranks hypotheses by sum log p~ / length**penalty.

A whole lambda grid is decoded in one batch: every prompt is replicated once per lambda (lambda 0
is the Pilot alone), so the grid costs one pass. Beam search further replicates each row
`num_beams` times; after every step both models' caches and the Copilot's previous prediction
are reordered with the surviving beams (`FusedState.reorder`).

Under ZeRO-3 every forward is a collective: the loop stops only when all rows on all ranks are
finished (one all-reduce a step), and callers pad their shards to the same number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tcp.evaluation.decode_caches import FEEDBACK, FusedState
from tcp.models.pilot import PilotTap


@dataclass
class DecodeOptions:
    """How to decode (the `eval.*` config keys of the same names)."""

    max_new_tokens: int = 8
    strategy: str = "greedy"
    """'greedy' | 'sample' | 'beam'."""
    fusion: str = "probs"
    """'probs' (p_hat + lambda f) | 'logits' (z + lambda f)."""
    num_beams: int = 4
    length_penalty: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    """Stop strings (need `decode`): greedy/sampled rows end once their text contains one; beam
    search runs to EOS or the budget. Callers cut texts with `cut_at_stop` either way."""
    seed: int = 0
    """Sampling seed (each rank draws from seed + rank)."""
    copilot_feedback: str = "prediction"
    """The Copilot's input for the previous position: 'prediction' (its own f, the paper) or
    'realised' (onehot(emitted token) - p_hat, as in training); `eval.copilot_feedback`."""

    def __post_init__(self) -> None:
        if self.strategy not in ("greedy", "sample", "beam"):
            raise ValueError(f"strategy must be greedy|sample|beam, got {self.strategy!r}")
        if self.fusion not in ("probs", "logits"):
            raise ValueError(f"fusion must be probs|logits, got {self.fusion!r}")
        if self.copilot_feedback not in FEEDBACK:
            raise ValueError(f"copilot_feedback must be prediction|realised, got "
                             f"{self.copilot_feedback!r}")


@dataclass
class DecodeStats:
    """Generation diagnostics (docs/method.md §7), per output row (lambda-major: row = l * B +
    b)."""

    flips: torch.Tensor
    """(R,) decoding steps of the output where the fused argmax differs from the Pilot's: the
    Copilot changed the top choice (beam search: along the returned hypothesis; sampling: the
    argmax, not the drawn token)."""
    max_abs_f: list[float] = field(default_factory=list)
    """max |f| over the vocabulary, per (row, step) of unfinished rows."""
    margin: list[float] = field(default_factory=list)
    """Pilot top-1 minus top-2 probability, per (row, step) of unfinished rows."""
    steps: int = 0
    """Decoding steps run (forwards of each model after the prompt)."""
    hit_budget: torch.Tensor | None = None
    """(R,) bool: the output ended on the budget (max_new_tokens) without EOS or a stop string:
    its answer may be cut."""
    _pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=list, repr=False)

    def record(self, p_hat: torch.Tensor, f: torch.Tensor, live: torch.Tensor) -> None:
        """Keep this step's margins and max |f| on the device (no host sync per step)."""
        top2 = p_hat.topk(2, dim=-1).values
        self._pending.append((top2[:, 0] - top2[:, 1], f.abs().amax(-1), live))

    def finish(self) -> DecodeStats:
        """Move the recorded per-step values of live rows to the lists (one sync)."""
        if self._pending:
            margin, fmax, live = (torch.cat(x) for x in zip(*self._pending, strict=True))
            self.margin += margin[live].tolist()
            self.max_abs_f += fmax[live].tolist()
            self._pending.clear()
        return self


def fuse(z: torch.Tensor, f: torch.Tensor, lam: torch.Tensor, fusion: str,
         p_hat: torch.Tensor | None = None) -> torch.Tensor:
    """Scores whose argmax is the fused choice: p_hat + lam f ('probs') or z + lam f ('logits').

    z, f: (R, V) fp32; lam: (R,) (0 rows give the Pilot alone); p_hat: softmax(z) if known.
    """
    if fusion == "probs":
        return (torch.softmax(z, dim=-1) if p_hat is None else p_hat) + lam[:, None] * f
    return z + lam[:, None] * f


def fused_log_probs(z: torch.Tensor, f: torch.Tensor, lam: torch.Tensor,
                    fusion: str) -> torch.Tensor:
    """log p~ (R, V): the fused distribution, clamped at 0 and renormalised ('probs').

    Rows with lambda 0 are exactly log_softmax(z); a row whose fused mass is all clamped away
    falls back to the Pilot's distribution.
    """
    pilot = torch.log_softmax(z, dim=-1)
    if fusion == "logits":
        fused = torch.log_softmax(z + lam[:, None] * f, dim=-1)
    else:
        p = (pilot.exp() + lam[:, None] * f).clamp_min(0.0)
        total = p.sum(-1, keepdim=True)
        fused = torch.where(total > 0, (p / total.clamp_min(1e-30)).log(), pilot)
    return torch.where(lam[:, None] == 0, pilot, fused)


def _by_lambda(seqs: Sequence[list[int]], B: int, eos_id: int, pad_id: int
               ) -> list[list[list[int]]]:
    """Lambda-major rows (row = l * B + b) -> tokens[l][b], cut at EOS/pad."""
    return [[strip_generated(seqs[li * B + b], eos_id, pad_id) for b in range(B)]
            for li in range(len(seqs) // B)]


def all_ranks_done(done: bool, device: torch.device) -> bool:
    """True when `done` holds on every rank (one all-reduce; keeps ZeRO-3 ranks in step)."""
    if not dist.is_initialized():
        return done
    t = torch.tensor([0 if done else 1], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t) == 0


def _filter_and_sample(logp: torch.Tensor, opts: DecodeOptions,
                       gen: torch.Generator) -> torch.Tensor:
    """One draw per row from exp(logp) after temperature, top-k and top-p."""
    scores = logp / opts.temperature
    if opts.top_k > 0 and opts.top_k < scores.shape[-1]:
        kth = scores.topk(opts.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if opts.top_p < 1.0:
        sorted_s, order = scores.sort(dim=-1, descending=True)
        cum = torch.softmax(sorted_s, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_s, dim=-1) >= opts.top_p  # mass before this token
        sorted_s = sorted_s.masked_fill(drop, -math.inf)
        scores = torch.full_like(scores, -math.inf).scatter(-1, order, sorted_s)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs.cpu() if gen.device.type == "cpu" else probs, 1,
                             generator=gen)[:, 0].to(logp.device)


def _hits_stop(toks: list[int], stop: Sequence[str],
               decode: Callable[[list[int]], str] | None) -> bool:
    return bool(stop) and decode is not None and any(s in decode(toks) for s in stop)


def strip_generated(seq: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Generated ids up to (not including) the first EOS or pad."""
    out = []
    for t in seq:
        if t in (eos_id, pad_id):
            break
        out.append(t)
    return out


@torch.no_grad()
def fused_generate(pilot: torch.nn.Module, tap: PilotTap, copilot: torch.nn.Module | None,
                   prompts: Sequence[Sequence[int]], *, lambdas: Sequence[float], eos_id: int,
                   pad_id: int, device: torch.device, opts: DecodeOptions | None = None,
                   decode: Callable[[list[int]], str] | None = None, fusion: str | None = None,
                   max_new_tokens: int | None = None,
                   ) -> tuple[list[list[list[int]]], DecodeStats]:
    """Decode `prompts` once per lambda. `opts` defaults to greedy; `fusion`/`max_new_tokens`
    override it. `decode` (ids -> text) enables stop strings.

    Returns tokens[l][b] (generated ids of prompt b under lambdas[l], EOS excluded; stop strings
    are *not* cut here, see `cut_at_stop`) and the stats.
    """
    opts = opts or DecodeOptions()
    if fusion is not None or max_new_tokens is not None:
        opts = DecodeOptions(**{**vars(opts), "fusion": fusion or opts.fusion,
                                "max_new_tokens": max_new_tokens or opts.max_new_tokens})
    if opts.strategy == "beam":
        toks, st = _beam_search(pilot, tap, copilot, prompts, lambdas=lambdas, eos_id=eos_id,
                                pad_id=pad_id, device=device, opts=opts)
        if opts.stop and decode is not None:  # a beam holding a stop string ended there
            held = torch.tensor([_hits_stop(t, opts.stop, decode) for ts in toks for t in ts],
                                dtype=torch.bool, device=device)  # rows are lambda-major
            st.hit_budget = ~held & st.hit_budget  # type: ignore[operator]
        return toks, st
    B = len(prompts)
    rows = [p for _ in lambdas for p in prompts]
    R = len(rows)
    lam = torch.tensor([lv for lv in lambdas for _ in prompts], dtype=torch.float32,
                       device=device)
    state = FusedState.create(pilot, tap, copilot, device, opts.copilot_feedback)
    z, f = state.start(rows, pad_id)
    gen = None
    if opts.strategy == "sample":
        rank = dist.get_rank() if dist.is_initialized() else 0
        gen = torch.Generator(device="cuda" if device.type == "cuda" else "cpu")
        gen.manual_seed(opts.seed + rank)
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    out = torch.full((R, opts.max_new_tokens), pad_id, dtype=torch.long, device=device)
    stats = DecodeStats(flips=torch.zeros(R, dtype=torch.long, device=device))
    for i in range(opts.max_new_tokens):
        stats.steps = i + 1
        p_hat = torch.softmax(z, dim=-1)
        pilot_top = z.argmax(-1)
        fused_top = pilot_top if copilot is None else fuse(z, f, lam, opts.fusion, p_hat).argmax(-1)
        if gen is None:
            nxt = fused_top
        else:
            nxt = _filter_and_sample(fused_log_probs(z, f, lam, opts.fusion), opts, gen)
        live = ~finished
        stats.flips += ((fused_top != pilot_top) & live).long()  # the Copilot's, not chance's
        stats.record(p_hat, f, live)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        out[:, i] = nxt
        finished |= nxt == eos_id
        if opts.stop and decode is not None:
            for r in (~finished).nonzero()[:, 0].tolist():
                if _hits_stop(out[r, :i + 1].tolist(), opts.stop, decode):
                    finished[r] = True
        if all_ranks_done(bool(finished.all()), device) or i == opts.max_new_tokens - 1:
            break
        z, f = state.advance(nxt)
    stats.hit_budget = ~finished  # rows end early only on EOS or a stop string
    return _by_lambda(out.tolist(), B, eos_id, pad_id), stats.finish()


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the first stop string it contains."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def _beam_search(pilot: torch.nn.Module, tap: PilotTap, copilot: torch.nn.Module | None,
                 prompts: Sequence[Sequence[int]], *, lambdas: Sequence[float], eos_id: int,
                 pad_id: int, device: torch.device, opts: DecodeOptions
                 ) -> tuple[list[list[list[int]]], DecodeStats]:
    """Beam search on log p~ (HF semantics: 2K candidates per group; an EOS candidate within
    the top K finishes a hypothesis scored sum log p~ / length**length_penalty, EOS counted; a
    group stops once K hypotheses are finished and no running beam can beat the worst)."""
    K, B, T = opts.num_beams, len(prompts), opts.max_new_tokens
    G = B * len(lambdas)  # groups, lambda-major
    rows = [p for _ in lambdas for p in prompts for _ in range(K)]
    lam = torch.tensor([lv for lv in lambdas for _ in prompts for _ in range(K)],
                       dtype=torch.float32, device=device)
    state = FusedState.create(pilot, tap, copilot, device, opts.copilot_feedback)
    z, f = state.start(rows, pad_id)
    scores = torch.full((G, K), -math.inf, device=device)
    scores[:, 0] = 0.0  # identical beams at start: only the first one may expand
    hist = torch.zeros(G * K, 0, dtype=torch.long, device=device)
    flip_hist = torch.zeros(G * K, 0, dtype=torch.bool, device=device)
    done = [False] * G
    hyps: list[list[tuple[float, list[int], int, bool]]] = [[] for _ in range(G)]  # score,
    # ids, flips, ended on the budget (no EOS)
    stats = DecodeStats(flips=torch.zeros(G, dtype=torch.long, device=device))
    base = torch.arange(G, device=device)[:, None] * K

    def bound(best_running: float, length: int) -> float:
        lp = opts.length_penalty
        return best_running / (T ** lp if lp > 0 else length ** lp)

    def add(g: int, score: float, ids: list[int], flips: int, length: int,
            cut: bool = False) -> None:
        hyps[g].append((score / length ** opts.length_penalty, ids, flips, cut))
        hyps[g].sort(key=lambda h: -h[0])
        del hyps[g][K:]

    for i in range(T):
        stats.steps = i + 1
        logp = fused_log_probs(z, f, lam, opts.fusion)  # (G*K, V)
        p_hat = torch.softmax(z, dim=-1)
        # A flip: the Copilot changes the top choice at this step (as in greedy decoding).
        flipped = fuse(z, f, lam, opts.fusion, p_hat).argmax(-1) != z.argmax(-1)
        live_rows = torch.tensor([not done[g] for g in range(G)], device=device)
        stats.record(p_hat, f, live_rows.repeat_interleave(K))
        V = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(G, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=-1)
        parent, tok = top_i // V, top_i % V
        is_eos = tok == eos_id
        rank = torch.arange(top_s.shape[1], device=device)[None, :]
        for g, c in (is_eos & (rank < K) & live_rows[:, None]).nonzero().tolist():
            row = int(base[g, 0] + parent[g, c])
            add(g, float(top_s[g, c]), hist[row].tolist(),
                int(flip_hist[row].sum() + flipped[row]), i + 1)
        keep = torch.argsort(is_eos.int(), dim=1, stable=True)[:, :K]  # first K non-EOS
        scores = top_s.gather(1, keep)
        src = (base + parent.gather(1, keep)).view(-1)
        new_tok = tok.gather(1, keep).view(-1)
        hist = torch.cat([hist[src], new_tok[:, None]], dim=1)
        flip_hist = torch.cat([flip_hist[src], flipped[src][:, None]], dim=1)
        best = scores[:, 0].tolist()
        for g in range(G):
            if not done[g] and len(hyps[g]) == K and bound(best[g], i + 2) <= hyps[g][-1][0]:
                done[g] = True
        if all_ranks_done(all(done), device) or i == T - 1:
            break
        state.reorder(src)
        z, f = state.advance(new_tok)
    for g in range(G):
        if not done[g]:  # out of budget: running beams compete at their length
            for k in range(K):
                row = g * K + k
                add(g, float(scores[g, k]), hist[row].tolist(), int(flip_hist[row].sum()),
                    hist.shape[1], cut=True)
    for g in range(G):
        stats.flips[g] = hyps[g][0][2]
    stats.hit_budget = torch.tensor([hyps[g][0][3] for g in range(G)], device=device)
    return _by_lambda([hyps[g][0][1] for g in range(G)], B, eos_id, pad_id), stats.finish()
