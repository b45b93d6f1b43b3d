"""The measuring half of tools/gpu_check.sh: one JSON of step times, memory and kernel figures.

    python tools/gpu_check.py                                  # CUDA, ~1B Pilot (preset 1b)
    python tools/gpu_check.py --device cpu --preset tiny --out /tmp/x.json   # the CPU path
    python tools/gpu_check.py train.pilot.micro_batch_size=4   # config overrides for the joint run

What it measures (docs/gpu_check.md has every JSON key and its goal):
1. Joint steps of the library's own `Trainer` (both DeepSpeed ZeRO-3 engines, world size 1,
   in this process; Pilot and Copilot built from config, nothing downloaded, the arithmetic
   data source), in three arms that share the two engines and run in interleaved blocks after
   a warm-up: `joint` (the Zarr Mistake Log, the default), `log_off` (the RAM log,
   `mistake_log.backend=memory`) and `pilot_only` (`train.copilot_start_step` beyond the last
   step: no Copilot updates, RAM log). Medians of the timed steps. Time and peak memory are
   read at the one boundary between the engines' phases (`Trainer.copilot_step`).
2. The fused Copilot and Pilot losses against the eager paths at the default
   `kernels.chunk_mib` (tools/bench_kernels.py's cases and measurement).
3. Decode time per token with and without the Copilot (`tcp.evaluation.decoding.fused_generate`, the
   method of tools/bench_decode.py: (T tokens - 1 token) / (T - 1), interleaved, medians).
4. Peak memory of the evaluation (teacher-forced diagnostics, fused decoding) against the
   (B, T, V) fp32 logits: tools/bench_eval_memory.py, on the check's device.

Memory is `torch.cuda.max_memory_allocated` on CUDA and the peak resident set on CPU (the CPU
figures only show that the pipeline runs: RSS does not grow when freed memory is reused).
Torch is imported only after the arguments are read, so `--device cpu` hides any GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

# tcp must be installed (gpu_check.sh installs the checkout editable); the benchmarks reused
# below are imported from this file's folder, which Python puts first on sys.path.
ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of one check."""

    dtype: str
    """model.dtype of the joint run and of the decode/eval models."""
    pilot: dict[str, int]
    """model.arch of the Pilot (a LLaMA built from config)."""
    copilot: dict[str, int]
    """copilot.* sizes."""
    micro_batch: int
    """Pilot sequences per step; the Copilot trains on these entries plus `replay`."""
    replay: int
    """mistake_log.replay_size."""
    warmup: int
    """Untimed steps per arm."""
    steps: int
    """Timed steps per arm (in blocks of `block`, arms interleaved)."""
    block: int
    kernels: dict[str, int]
    """tools/bench_kernels.py sizes: tokens, dim, vocab, repeats."""
    decode: dict[str, int]
    """batch, prompt_len, new_tokens, repeats."""
    eval_mem: dict[str, int]
    """vocab V, batch B and sequence length T of the evaluation-memory check."""


PRESETS = {
    # LLaMA-3.2-1B's shape (GQA 32/8 heads) on the embedded arithmetic task's 100-token vocabulary;
    # a Copilot of ~1/7 of its parameters. Kernel and evaluation checks at V = 128256.
    "1b": Preset(
        dtype="bfloat16",
        pilot=dict(hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                   num_kv_heads=8, max_position_embeddings=256),
        copilot=dict(hidden_size=1024, intermediate_size=4096, num_layers=8, num_heads=16),
        micro_batch=8, replay=8, warmup=3, steps=12, block=4,
        kernels=dict(tokens=4096, dim=2048, vocab=128256, repeats=10),
        decode=dict(batch=8, prompt_len=64, new_tokens=32, repeats=5),
        eval_mem=dict(vocab=128256, batch=8, seq_len=512),
    ),
    # Seconds on a CPU: every stage runs, the figures mean nothing.
    "tiny": Preset(
        dtype="float32",
        pilot=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, max_position_embeddings=256),
        copilot=dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4),
        micro_batch=4, replay=4, warmup=1, steps=2, block=1,
        kernels=dict(tokens=64, dim=32, vocab=512, repeats=1),
        decode=dict(batch=2, prompt_len=8, new_tokens=8, repeats=3),
        eval_mem=dict(vocab=512, batch=8, seq_len=64),
    ),
}


def arch_yaml(d: dict[str, int]) -> str:
    """A flow-style YAML mapping for a `section.key={...}` override."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def run_config(p: Preset, out: Path, overrides: list[str]) -> Any:
    """The joint run's config: configs/default.yaml with the preset's sizes, no base phase,
    Copilot from scratch, no evaluation, tracking off."""
    from tcp.config import load_config

    c = p.copilot
    return load_config(ROOT / "configs" / "default.yaml", [
        "base.enabled=false", "copilot.init_from=none", "eval.enabled=false",
        "tracking.enabled=false", f"output_dir={out}", f"model.dtype={p.dtype}",
        f"model.arch={arch_yaml(p.pilot)}",
        f"copilot.hidden_size={c['hidden_size']}",
        f"copilot.intermediate_size={c['intermediate_size']}",
        f"copilot.num_layers={c['num_layers']}", f"copilot.num_heads={c['num_heads']}",
        f"train.pilot.micro_batch_size={p.micro_batch}",
        f"train.copilot.micro_batch_size={p.micro_batch + p.replay}",
        f"mistake_log.replay_size={p.replay}",
        # all three arms step the same two engines: the schedules cover every step
        f"train.steps={3 * (p.warmup + -(-p.steps // p.block) * p.block)}",
        f"data.train_size={max(200, 4 * p.micro_batch * (p.warmup + p.steps))}",
        *overrides,
    ])


# ---------------------------------------------------------------------- 1. joint steps
def _sync(dev: Any) -> None:
    from bench_kernels import _sync as sync

    sync(dev)


def phase_timed(trainer_cls: type) -> type:
    """`trainer_cls` (tcp.training.trainer.Trainer) with time and peak memory read at the start of
    the step, at the start of the Copilot's phase and at the end. The step is the library's."""
    from bench_kernels import _peak, _reset_peak

    class PhaseTimed(trainer_cls):  # type: ignore[misc, valid-type]
        def timed_step(self) -> dict[str, float]:
            _sync(self.device)
            rec = {"pilot_start_bytes": float(_reset_peak(self.device))}
            self._rec = rec
            t0 = time.perf_counter()
            self.train_step()
            _sync(self.device)
            end = time.perf_counter()
            if "copilot_t0" in rec:
                rec["copilot_s"] = end - rec.pop("copilot_t0")
                rec["copilot_peak_bytes"] = float(_peak(self.device))
            else:
                rec["pilot_peak_bytes"] = float(_peak(self.device))
            rec["step_s"] = end - t0
            rec["pilot_s"] = rec["step_s"] - rec.get("copilot_s", 0.0)
            self.step += 1
            return rec

        def copilot_step(self, current: Any) -> Any:
            rec = self._rec
            rec["pilot_peak_bytes"] = float(_peak(self.device))
            rec["copilot_start_bytes"] = float(_reset_peak(self.device))
            rec["copilot_t0"] = time.perf_counter()
            return super().copilot_step(current)

    return PhaseTimed


def joint_steps(cfg: Any, p: Preset, device: Any) -> dict[str, Any]:
    """Median step times of the three arms, the Copilot's share, peak memory per phase."""
    from tcp.data.prepare import model_context, prepare_data
    from tcp.runtime.tracking import Tracker
    from tcp.training.build import build_engines, build_mistake_log, load_tokenizer
    from tcp.training.engines import param_count
    from tcp.training.trainer import Trainer

    tok = load_tokenizer(cfg)
    data = prepare_data(cfg, tok, context=model_context(cfg, tok))  # max_length: auto resolved
    cfg, samples = data.cfg, data.samples["train"]
    t0 = time.perf_counter()
    pilot, copilot, tap = build_engines(cfg, tok, None, 1)
    build_s = time.perf_counter() - t0
    n_p, n_c = param_count(pilot.module), param_count(copilot.module)
    vocab, d = int(pilot.module.config.vocab_size), int(pilot.module.config.hidden_size)
    out = Path(cfg.output_dir)
    memory = dataclasses.replace(cfg.mistake_log, backend="memory")
    cfg_off = dataclasses.replace(cfg, mistake_log=memory)
    no_copilot = dataclasses.replace(cfg.train, copilot_start_step=cfg.train.steps + 10**6)
    cfg_pilot = dataclasses.replace(cfg_off, train=no_copilot)
    tracker = Tracker(cfg, rank=0)  # tracking.enabled=false: no MLflow
    Timed = phase_timed(Trainer)
    common = dict(pilot=pilot, copilot=copilot, tap=tap, samples=samples,
                  pad_id=tok.pad_token_id, rank=0, world=1, device=device, tracker=tracker)
    logs = {"joint": build_mistake_log(cfg, out, rank=0, d_model=d, vocab=vocab),
            "log_off": build_mistake_log(cfg_off, out, rank=0, d_model=d, vocab=vocab),
            "pilot_only": build_mistake_log(cfg_pilot, out, rank=0, d_model=d, vocab=vocab)}
    cfgs = {"joint": cfg, "log_off": cfg_off, "pilot_only": cfg_pilot}
    arms = {name: Timed(cfgs[name], log=logs[name], **common) for name in cfgs}
    recs: dict[str, list[dict[str, float]]] = {name: [] for name in arms}
    try:
        for t in arms.values():
            for _ in range(p.warmup):
                t.timed_step()
        names = list(arms)
        for i in range(-(-p.steps // p.block)):
            for name in names if i % 2 == 0 else names[::-1]:
                for _ in range(p.block):
                    recs[name].append(arms[name].timed_step())
    finally:
        for log in logs.values():
            log.close()
        tap.remove()
    med = {name: statistics.median(r["step_s"] for r in rs) for name, rs in recs.items()}
    j = recs["joint"]
    copilot_s = statistics.median(r["copilot_s"] for r in j)
    flops_ratio = n_c / n_p  # forward FLOPs per token ~ 2 x parameters, for both models
    goal = 1 + flops_ratio + 0.05
    return {
        "params": {"pilot": n_p, "copilot": n_c},
        "flops_ratio": flops_ratio,
        "sequences_per_step": {"pilot": p.micro_batch,
                               "copilot": p.replay + (p.micro_batch
                                                      if cfg.mistake_log.include_current else 0)},
        "engines_build_s": build_s,
        "median_s": med,
        "copilot_phase_s": copilot_s,
        "pilot_phase_s": statistics.median(r["pilot_s"] for r in j),
        "steps_timed": len(j), "warmup_steps": p.warmup,
        "joint_over_pilot_only": med["joint"] / med["pilot_only"],
        "joint_over_pilot_only_goal": goal,
        "copilot_share": copilot_s / med["joint"],
        "log_on_over_off": med["joint"] / med["log_off"],
        "peak_memory": {
            "pilot_phase_bytes": max(r["pilot_peak_bytes"] for r in j),
            "copilot_phase_bytes": max(r["copilot_peak_bytes"] for r in j),
            "pilot_phase_start_bytes": max(r["pilot_start_bytes"] for r in j),
            "copilot_phase_start_bytes": max(r["copilot_start_bytes"] for r in j),
            "pilot_only_step_bytes": max(r["pilot_peak_bytes"] for r in recs["pilot_only"]),
        },
    }


# ---------------------------------------------------------------------- 2. fused losses
def fused_losses(p: Preset, device: str, dtype: str, chunk_mib: float) -> dict[str, Any]:
    """tools/bench_kernels.py's copilot_loss and pilot_loss cases, eager vs fused."""
    import bench_kernels as bk

    k = p.kernels
    argv = ["--device", device, "--dtype", dtype, "--tokens", str(k["tokens"]),
            "--dim", str(k["dim"]), "--chunk-mib", str(chunk_mib),
            "--repeats", str(k["repeats"]), "--warmup", "1"]
    a = bk.parse(argv)
    a.argv = argv  # run_isolated's CPU children parse the same arguments
    res: dict[str, Any] = {"chunk_mib": chunk_mib, "vocab": k["vocab"], "tokens": k["tokens"],
                           "dim": k["dim"], "dtype": dtype}
    for op in ("copilot_loss", "pilot_loss"):
        eager = bk.run_isolated(op, "eager", a, k["vocab"])
        fused = bk.run_isolated(op, "fused", a, k["vocab"])
        total = {n: r["fwd_s"] + r["bwd_s"] for n, r in (("eager", eager), ("fused", fused))}
        res[op] = {"eager": eager, "fused": fused,
                   "time_ratio": total["fused"] / total["eager"],
                   "memory_ratio": fused["peak_bytes"] / max(eager["peak_bytes"], 1.0)}
    return res


# ---------------------------------------------------------------------- 3. decoding
def decode_times(cfg: Any, p: Preset, device: Any) -> dict[str, Any]:
    """Seconds per generated token of tcp's decoding loop with and without the Copilot, on
    the joint run's Pilot and Copilot shapes (random weights, EOS off)."""
    import torch
    from bench_decode import copilot_flops_per_token, flops_per_token

    from tcp.evaluation.decoding import DecodeOptions, fused_generate
    from tcp.models.pilot import PilotTap, torch_dtype
    from tcp.training.build import build_copilot, build_pilot, load_tokenizer

    tok = load_tokenizer(cfg)
    dt = torch_dtype(cfg.model.dtype)
    with torch.device(device):  # initialised where they run: no host copy of the weights
        pilot = build_pilot(cfg, tok, None, 1).to(dt).eval()
        copilot = build_copilot(cfg, vocab=len(tok), d_pilot=cfg.model.arch.hidden_size,
                                base=None).to(dt).eval()
    tap = PilotTap(pilot, impl=cfg.kernels.impl)
    dec = p.decode
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (dec["prompt_len"],), generator=g).tolist()
               for _ in range(dec["batch"])]
    T = dec["new_tokens"]

    def run(cop: Any, steps: int) -> None:
        fused_generate(pilot, tap, cop, prompts, lambdas=[1.0], eos_id=-1, pad_id=0,
                       device=device, opts=DecodeOptions(max_new_tokens=steps))

    variants = {"pilot_1": (None, 1), "pilot": (None, T), "copilot_1": (copilot, 1),
                "pilot+copilot": (copilot, T)}
    samples: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for cop, steps in variants.values():
            run(cop, steps)  # warm-up
        for _ in range(dec["repeats"]):  # interleaved: drift hits every variant alike
            for name, (cop, steps) in variants.items():
                _sync(device)
                t0 = time.perf_counter()
                run(cop, steps)
                _sync(device)
                samples[name].append(time.perf_counter() - t0)
    tap.remove()
    t = {k: statistics.median(v) for k, v in samples.items()}
    per_tok = {"pilot": (t["pilot"] - t["pilot_1"]) / (T - 1),
               "pilot+copilot": (t["pilot+copilot"] - t["copilot_1"]) / (T - 1)}
    a, c = cfg.model.arch, cfg.copilot
    ctx = dec["prompt_len"] + T // 2
    fp = flops_per_token(d=a.hidden_size, layers=a.num_layers, inter=a.intermediate_size,
                         vocab=len(tok), context=ctx,
                         kv_heads_ratio=(a.num_kv_heads or a.num_heads) / a.num_heads)
    fc = copilot_flops_per_token(d=c.hidden_size, layers=c.num_layers, inter=c.intermediate_size,
                                 vocab=len(tok), d_pilot=a.hidden_size, context=T // 2,
                                 memory=ctx)
    return {"batch": dec["batch"], "prompt_len": dec["prompt_len"], "new_tokens": T,
            "pilot_s_per_token": per_tok["pilot"],
            "pilot_copilot_s_per_token": per_tok["pilot+copilot"],
            "ratio": per_tok["pilot+copilot"] / per_tok["pilot"],
            "flops_ratio": fc / fp, "goal": 1.1 * (1 + fc / fp)}


# ---------------------------------------------------------------------- 4. eval memory
def eval_memory(p: Preset, device: Any) -> dict[str, Any]:
    """tools/bench_eval_memory.py: peak memory of the teacher-forced diagnostics and of fused
    decoding at vocabulary V on `device`, against the (B, T, V) fp32 logits."""
    import bench_eval_memory

    e = p.eval_mem
    return bench_eval_memory.main(["--vocab", str(e["vocab"]), "--seq", str(e["seq_len"]),
                                   "--batch", str(e["batch"]), "--device", device.type])


# ---------------------------------------------------------------------- main
def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b",
                    help="sizes: 1b (a ~1B Pilot, for a GPU) or tiny (seconds on a CPU)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="model dtype (default: the preset's: bfloat16 for 1b, float32 for tiny)")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"),
                    help="the JSON written (default: gpu_check.json)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="scratch folder for the joint run's Mistake Log (default: a temporary "
                         "folder, removed at the end)")
    ap.add_argument("--skip", default="",
                    help="comma-separated stages to leave out: joint, kernels, decode, eval_memory")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for the joint run")
    a = ap.parse_args(argv)
    unknown = set(filter(None, a.skip.split(","))) - {"joint", "kernels", "decode", "eval_memory"}
    if unknown:
        ap.error(f"--skip: unknown stage(s) {sorted(unknown)}")
    return a


def goals(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each measured figure next to its goal (docs/gpu_check.md)."""
    out: dict[str, dict[str, Any]] = {}

    def add(name: str, value: float, goal: float, ok: bool) -> None:
        out[name] = {"value": value, "goal": goal, "met": bool(ok)}

    if "joint" in res:
        j = res["joint"]
        add("joint_over_pilot_only", j["joint_over_pilot_only"],
            j["joint_over_pilot_only_goal"],
            j["joint_over_pilot_only"] <= j["joint_over_pilot_only_goal"])
    if "fused_loss" in res:
        c = res["fused_loss"]["copilot_loss"]
        add("fused_copilot_loss_time", c["time_ratio"], 1.0, c["time_ratio"] <= 1.0)
        add("fused_copilot_loss_memory", c["memory_ratio"], 0.35, c["memory_ratio"] <= 0.35)
    if "decode" in res:
        d = res["decode"]
        add("decode_ratio", d["ratio"], d["goal"], d["ratio"] <= d["goal"])
    if "eval_memory" in res:
        e = res["eval_memory"]
        worst = max(e["diagnostics"]["peak_over_logits"], e["decoding"]["peak_over_logits"])
        add("eval_memory_over_logits", worst, 2.0, worst <= 2.0)
    return out


def main(argv: list[str] | None = None) -> int:
    a = parse(sys.argv[1:] if argv is None else argv)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(k, "1")  # nothing is downloaded; a stray lookup would only wait
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tcp.runtime.console import setup_logging  # light: no torch

    setup_logging()  # tcp's own [tcp] lines, as in the main job
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: the CPU path only
    # DeepSpeed's ZeRO-3 calls collectives torch has renamed, once per step; not ours to fix.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated",
                            FutureWarning)
    import deepspeed
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device (torch "
              f"{torch.__version__}); use --device cpu for the CPU path", file=sys.stderr)
        return 2
    from tcp.config import KernelsConfig
    from tcp.runtime.process_group import init_distributed

    p = PRESETS[a.preset]
    if a.dtype:
        p = dataclasses.replace(p, dtype=a.dtype)
    skip = set(filter(None, a.skip.split(",")))
    work = Path(a.workdir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    cfg = run_config(p, work / "run", a.overrides)
    _, _, device = init_distributed()
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    res: dict[str, Any] = {
        "device": name, "preset": a.preset, "dtype": p.dtype,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__},
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "pilot_arch": p.pilot, "copilot_arch": p.copilot, "seconds": {},
    }
    stages = [("kernels", "fused_loss", lambda: fused_losses(
                  p, device.type, p.dtype, KernelsConfig().chunk_mib)),
              ("eval_memory", "eval_memory", lambda: eval_memory(p, device)),
              ("decode", "decode", lambda: decode_times(cfg, p, device)),
              ("joint", "joint", lambda: joint_steps(cfg, p, device))]
    try:
        for stage, key, fn in stages:
            if stage in skip:
                continue
            t0 = time.perf_counter()
            print(f"[gpu_check] {stage} ...", flush=True)
            res[key] = fn()
            res["seconds"][stage] = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    res["goals"] = goals(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    for gname, g in res["goals"].items():
        print(f"[gpu_check] {gname:28s} {g['value']:8.3f}  goal {g['goal']:.3f}  "
              f"{'met' if g['met'] else 'MISSED'}")
    print(f"[gpu_check] wrote {a.out.resolve()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
