"""What the Copilot changed, token by token (the paper's Figure 4): trace and plot one example.

`trace_rectification` decodes one prompt greedily on the fused distribution and keeps, at each
step, the Pilot's top tokens, the Copilot's correction lambda*f on them, and the fused result.
`pick_example` finds a prompt whose answer the Copilot changes. Both are collective under
ZeRO-3 (every rank runs the same forwards on the same prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from tcp.data.collate import encode_prompt
from tcp.evaluation.answer_scoring import AnswerScorer
from tcp.evaluation.decode_caches import FusedState
from tcp.evaluation.decoding import DecodeOptions, all_ranks_done, fuse, fused_generate
from tcp.models.pilot import PilotTap


@dataclass
class StepTrace:
    """One decoding step of the traced example."""

    tokens: list[str]
    """Candidate tokens shown: the Pilot's top-n and the fused top-n (union, Pilot order first)."""
    pilot: list[float]
    """p_hat of each candidate."""
    correction: list[float]
    """lambda * f of each candidate."""
    fused: list[float]
    """p_hat + lambda f ('probs') or softmax(z + lambda f) ('logits') of each candidate."""
    pilot_choice: str
    chosen: str


@dataclass
class Rectification:
    """A traced example."""

    prompt: str
    lam: float
    fusion: str
    steps: list[StepTrace] = field(default_factory=list)
    pilot_answer: str = ""
    fused_answer: str = ""
    gold: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "lambda": self.lam, "fusion": self.fusion,
                "gold": self.gold, "pilot_answer": self.pilot_answer,
                "fused_answer": self.fused_answer, "steps": [vars(s) for s in self.steps]}


@torch.no_grad()
def pick_example(pilot: torch.nn.Module, tap: PilotTap, copilot: torch.nn.Module,
                 records: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, *, lam: float,
                 fusion: str, max_new_tokens: int, device: torch.device, scan: int = 64,
                 answer_format: str = "auto", feedback: str = "prediction") -> int:
    """Index of the first of `records[:scan]` whose greedy answer the Copilot changes (0 if
    none does): prefers a change that fixes the answer, then any change."""
    recs = records[:scan]
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in recs]
    toks, _ = fused_generate(pilot, tap, copilot, prompts, lambdas=[0.0, lam], fusion=fusion,
                             max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id,
                             pad_id=tokenizer.pad_token_id, device=device,
                             opts=DecodeOptions(copilot_feedback=feedback))
    changed = [b for b in range(len(recs)) if toks[0][b] != toks[1][b]]
    scorer = AnswerScorer.for_golds(answer_format, [r["answer"] for r in recs])
    fixed = [b for b in changed if scorer.correct(tokenizer.decode(toks[1][b]), recs[b]["answer"])]
    return (fixed or changed or [0])[0]


@torch.no_grad()
def trace_rectification(pilot: torch.nn.Module, tap: PilotTap, copilot: torch.nn.Module,
                        prompt: str, tokenizer: PreTrainedTokenizerBase, *, lam: float,
                        fusion: str, max_new_tokens: int, device: torch.device, top_n: int = 4,
                        gold: str | None = None, feedback: str = "prediction") -> Rectification:
    """Greedy fused decoding of `prompt` at `lam` (rows: Pilot alone, fused), every step kept;
    `feedback`: `DecodeOptions.copilot_feedback`."""
    ids = encode_prompt(tokenizer, prompt)
    state = FusedState.create(pilot, tap, copilot, device, feedback)
    z, f = state.start([ids, ids], tokenizer.pad_token_id)
    lams = torch.tensor([0.0, lam], device=device)
    out = Rectification(prompt=prompt, lam=lam, fusion=fusion, gold=gold)
    answers: list[list[int]] = [[], []]
    done = [False, False]
    eos = tokenizer.eos_token_id
    for i in range(max_new_tokens):
        scores = fuse(z, f, lams, fusion)
        nxt = scores.argmax(-1)
        p_hat = torch.softmax(z[1], -1)
        fused = scores[1] if fusion == "probs" else torch.softmax(scores[1], -1)
        cand = p_hat.topk(top_n).indices.tolist()
        cand += [t for t in fused.topk(top_n).indices.tolist() if t not in cand]
        if not done[1]:
            out.steps.append(StepTrace(
                tokens=[_show(tokenizer, t) for t in cand],
                pilot=p_hat[cand].tolist(), correction=(lam * f[1, cand]).tolist(),
                fused=fused[cand].tolist(), pilot_choice=_show(tokenizer, int(z[1].argmax())),
                chosen=_show(tokenizer, int(nxt[1]))))
        for r in range(2):
            if not done[r]:
                if int(nxt[r]) == eos:
                    done[r] = True
                else:
                    answers[r].append(int(nxt[r]))
        if all_ranks_done(all(done), device) or i == max_new_tokens - 1:
            break
        z, f = state.advance(nxt)
    out.pilot_answer, out.fused_answer = (tokenizer.decode(a) for a in answers)
    return out


def _show(tokenizer: PreTrainedTokenizerBase, t: int) -> str:
    if t == tokenizer.eos_token_id:
        return "<eos>"
    s = tokenizer.decode([t])
    return repr(s)[1:-1] if s.strip() != s or not s else s


def plot_rectification(rect: dict[str, Any], path: Path) -> Path:
    """One panel per decoding step: p_hat, lambda*f and the fused score of the candidates.

    `rect` is `Rectification.to_dict()` (as stored in results.json)."""
    import matplotlib  # heavy: only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only when plotting

    steps = [StepTrace(**st) for st in rect["steps"]]
    n = max(len(steps), 1)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows + 0.8), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for i, (st, ax) in enumerate(zip(steps, axes.flat, strict=False)):
        y = range(len(st.tokens))
        h = 0.27
        ax.barh([v - h for v in y], st.pilot, height=h, label="Pilot p̂", color="#7f7f7f")
        ax.barh(list(y), st.correction, height=h, label="Copilot λf", color="#d62728")
        ax.barh([v + h for v in y], st.fused, height=h, label="fused", color="#1f77b4")
        ax.set_yticks(list(y), st.tokens)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.6)
        mark = "" if st.chosen == st.pilot_choice else "  (flipped)"
        ax.set_title(f"step {i + 1}: Pilot '{st.pilot_choice}' → '{st.chosen}'{mark}",
                     fontsize=9)
        ax.tick_params(labelsize=8)
    axes.flat[0].legend(fontsize=7, loc="lower right")
    gold = f"   gold: {rect['gold']!r}" if rect.get("gold") is not None else ""
    fig.suptitle(f"{rect['prompt'].strip()!r}\nPilot: {rect['pilot_answer']!r}   "
                 f"Pilot+Copilot (λ={rect['lambda']:g}, {rect['fusion']}): "
                 f"{rect['fused_answer']!r}{gold}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
