"""Small builders shared by tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from tcp.config import ArchConfig, CopilotConfig
from tcp.data.tokenizer import build_char_tokenizer
from tcp.models.copilot import Copilot
from tcp.models.pilot import build_llama


def tiny_pilot(seed: int = 0, d: int = 32, layers: int = 2):
    tok = build_char_tokenizer()
    arch = ArchConfig(hidden_size=d, intermediate_size=2 * d, num_layers=layers, num_heads=4)
    model = build_llama(arch, vocab_size=len(tok), pad_id=tok.pad_token_id,
                        bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, seed=seed)
    return model.eval(), tok


def sample_prompts(tok) -> list[list[int]]:
    """Three ragged arithmetic prompts as token ids (BOS first)."""
    texts = ["Q: 12+30=\nA: ", "Q: 7-2=\nA: ", "Q: Ann has 3 cups and gets 4 more.\nA: "]
    return [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def hf_generated(ids: list[int], tok) -> list[int]:
    """An HF `generate` continuation cut like tcp's decoding output (EOS/pad excluded)."""
    from tcp.evaluation.decoding import strip_generated

    return strip_generated(ids, tok.eos_token_id, tok.pad_token_id)


def tiny_t5(seed: int = 0, d: int = 32, layers: int = 2):
    """A tiny T5 encoder-decoder Pilot built from config, in eval mode (no dropout)."""
    from tcp.models.pilot import build_t5

    tok = build_char_tokenizer()
    arch = ArchConfig(family="t5", hidden_size=d, intermediate_size=2 * d, num_layers=layers,
                      num_heads=4)
    model = build_t5(arch, vocab_size=len(tok), pad_id=tok.pad_token_id,
                     eos_id=tok.eos_token_id, seed=seed)
    return model.eval(), tok


def tiny_copilot(vocab: int, d_pilot: int, *, d: int = 24, layers: int = 4,
                 randomize_head: bool = False, encoder_decoder: bool = False) -> Copilot:
    cfg = CopilotConfig(hidden_size=d, intermediate_size=2 * d, num_layers=layers, num_heads=4,
                        init_from="none")
    cop = Copilot(cfg, vocab_size=vocab, pilot_hidden=d_pilot,
                  encoder_decoder=encoder_decoder).eval()
    if randomize_head:
        with torch.no_grad():
            cop.head.weight.normal_(0, 0.5)
            cop.head.bias.normal_(0, 0.1)
    return cop


def tokenized_batch(tok, seed: int = 0, n: int = 6):
    """n generated arithmetic samples, tokenised (ragged prompts and answers)."""
    from tcp.data.arithmetic import generate
    from tcp.data.collate import tokenize_records

    samples, _ = tokenize_records(generate(seed, "train", n), tok, max_length=96)
    return samples


def fake_entries(step: int, *, n: int = 4, d: int = 16, k: int = 3, vocab: int = 100,
                 rank: int = 0, seed: int = 0):
    """A deterministic MistakeBatch for `step` (ragged lengths, realistic value ranges)."""
    from tcp.mistake_log.record import MistakeBatch, offsets_from_lengths

    g = torch.Generator().manual_seed(seed * 100_003 + step * 31 + rank)
    xl = torch.randint(1, 7, (n,), generator=g)
    yl = torch.randint(1, 6, (n,), generator=g)
    nx, nt = int(xl.sum()), int(yl.sum())
    probs = torch.rand(nt, vocab, generator=g).pow(8).softmax(-1)
    top_p, top_i = probs.topk(k, -1)
    return MistakeBatch(
        x_tilde=torch.randn(nx, d, generator=g), x_offsets=offsets_from_lengths(xl),
        h=torch.randn(nt, d, generator=g), y_offsets=offsets_from_lengths(yl),
        labels=torch.randint(vocab, (nt,), generator=g), topk_ids=top_i, topk_probs=top_p,
        residual=1 - top_p.sum(-1), step=torch.full((n,), step, dtype=torch.long),
        sample_id=torch.arange(n) + 1000 * step, rank=torch.full((n,), rank, dtype=torch.long),
        loss=torch.rand(n, generator=g))


ROOT = Path(__file__).resolve().parents[1]

# The 2-rank joint test run (tests/distributed/conftest.py: joint_run): a base phase, 24 joint
# steps, evaluation on 32 + 32 examples.
# The base phase keeps its short pre-2026-12-02 shape (warmup 30, equations and word problems),
# so the test runs' cost and behaviour do not follow the default's 3000-step base phase.
JOINT_ONLY = "train.copilot_tail_steps=0"
"""Test runs train the joint steps only (configs/default.yaml adds a Copilot tail); a test of
the tail sets it after this."""

SMALL = ("base.steps=30", "base.warmup_steps=30", "base.formats=[equation,word]",
         "base.corpus_size=2000", "data.train_size=1000", "data.val_size=32",
         "data.test_size=32", "train.steps=24", "train.log_every=6", "eval.batch_size=16",
         "eval.lambdas=[0.5,1.0]", "train.pilot.lr=1e-3", "train.pilot.warmup_steps=2",
         "train.copilot.warmup_steps=2", "train.pilot.micro_batch_size=8",
         "mistake_log.replay_size=8")


def launch(run_dir: Path, *overrides: str, env: dict[str, str] | None = None,
           check: bool = True, timeout: int = 400, ranks: int = 2,
           popen: bool = False, config: str = "configs/default.yaml",
           port: int | None = None, prefix: tuple[str, ...] = (),
           offline_from: Path | None = None,
           ) -> subprocess.CompletedProcess | subprocess.Popen:
    """`deepspeed --num_gpus <ranks> launcher/train.py` on `config` (default: the default
    config; joint steps only, `JOINT_ONLY`) into `run_dir`, tracking to `<run_dir>.db` unless
    overridden. `check` asserts exit
    code 0; `port`: the master port (default: derived from `run_dir`); `prefix`: a command the
    runner is started under (e.g. tcp-launch); `offline_from`: a finished run to train a
    Copilot from offline (`--offline-from`, in place of `--config`)."""
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    port = str(port or 29500 + (os.getpid() + hash(str(run_dir))) % 1000)
    source = ["--offline-from", str(offline_from)] if offline_from is not None else \
        ["--config", str(ROOT / config), JOINT_ONLY]
    cmd = [*prefix, deepspeed, "--num_gpus", str(ranks), "--master_port", port,
           str(ROOT / "launcher/train.py"), *source,
           f"output_dir={run_dir}", f"tracking.uri=sqlite:///{run_dir}.db", *overrides]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    if popen:
        return subprocess.Popen(cmd, cwd=run_dir.parent, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


# The `deepspeed` runner's own log lines (it runs before any tcp code, so tcp cannot quiet them;
# README "Quick start" explains each): its runner.py and launch.py, and the accelerator line of
# those two processes.
_RUNNER_LINE = re.compile(r"^\[[\d\- :,]+\] \[(INFO|WARNING)\] \[(runner|launch)\.py:\d+:\w+\] ")
_ACCELERATOR_LINE = re.compile(r"^\[[\d\- :,]+\] \[WARNING\] \[real_accelerator\.py:\d+:\w+\] "
                               r"Setting accelerator to CPU\.")
_THIRD_PARTY = (
    re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[[A-Z]+\] "),  # DeepSpeed's log format
    re.compile(r"^\S+:\d+: \w*Warning: "),  # a Python warning
    re.compile(r"^\[transformers\]"),  # transformers' logging
    re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d [A-Z]+ "),  # MLflow's logging
    re.compile(r"\d+(\.\d+)?(it/s|s/it)\]"),  # a tqdm bar (tcp's own bars are lines off a tty)
    re.compile(r"^DeepSpeed \S+ built successfully"),
)


def unexplained_console_lines(console: str) -> list[str]:
    """Lines of a main job's console (stdout + stderr) that are third-party output the README
    does not explain: anything in a third-party format except the runner's own lines, and
    "Setting accelerator to CPU" more than twice (the ranks' would be extra)."""
    lines = console.splitlines()
    own = f"{ROOT / 'tcp'}{os.sep}"  # tcp's own Python warnings are real: not counted here
    bad = [x for x in lines if not _RUNNER_LINE.match(x) and not _ACCELERATOR_LINE.match(x)
           and not x.startswith(own) and any(p.search(x) for p in _THIRD_PARTY)]
    accel = [x for x in lines if _ACCELERATOR_LINE.match(x)]
    return bad + (accel if len(accel) > 2 else [])
