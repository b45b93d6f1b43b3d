"""Peak memory of evaluation at a real vocabulary (CPU), against the size of the logits.

    python tools/bench_eval_memory.py                     # V=128256, T=512, batch 8
    python tools/bench_eval_memory.py --vocab 32000 --seq 256

A narrow Pilot and Copilot (d=64, 2 layers: the width does not change what is vocabulary-sized) are
built from config; a batch of `--batch` sequences of `--seq` tokens (half prompt, half answer) goes
through the teacher-forced diagnostics (tcp.evaluation.diagnostics) and through fused greedy
decoding (λ ∈ {0, 1}). Peak memory is what evaluation adds on top of the loaded models and data: on
the CPU the process's peak resident set (VmHWM, reset before each phase through
/proc/self/clear_refs; Linux only) minus its resident set before the phase, on CUDA (`--device
cuda`) the allocator's peak minus what was allocated before. The goal (issue 14): ≤ 2 × the logits'
own size, B·T·V·4 bytes in fp32.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

GIB = 2**30


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure(fn, device: torch.device) -> tuple[float, int]:
    """(seconds, peak bytes above what was held at the start) of fn(): the CUDA caching
    allocator's peak on a GPU, the process's peak resident set on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _status("VmRSS")
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - t0, torch.cuda.max_memory_allocated() - before
    return time.perf_counter() - t0, _status("VmHWM") - before


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence (prompt + answer)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--topk", type=int, default=64, help="mistake_log.topk")
    p.add_argument("--chunk-mib", type=float, default=64.0, help="kernels.chunk_mib")
    p.add_argument("--new-tokens", type=int, default=4, help="decoding steps")
    p.add_argument("--device", type=str, default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=str, default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from tcp.config import ArchConfig, CopilotConfig
    from tcp.data.collate import TokenizedSample
    from tcp.evaluation.decoding import DecodeOptions, fused_generate
    from tcp.evaluation.diagnostics import teacher_forced_diagnostics
    from tcp.models.copilot import Copilot
    from tcp.models.lm_head import use_fused_head
    from tcp.models.pilot import PilotTap, build_llama

    V, T, B = a.vocab, a.seq, a.batch
    arch = ArchConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      max_position_embeddings=T + a.new_tokens + 8)
    pilot = build_llama(arch, vocab_size=V, pad_id=0, bos_id=1, eos_id=2, seed=0).eval()
    use_fused_head(pilot)
    tap = PilotTap(pilot, impl="torch" if a.device == "cpu" else "auto")
    cop = Copilot(CopilotConfig(hidden_size=64, intermediate_size=128, num_layers=2,
                                num_heads=4, init_from="none"),
                  vocab_size=V, pilot_hidden=64).eval()
    g = torch.Generator().manual_seed(0)
    P = T // 2
    samples = [TokenizedSample(input_ids=[1, *torch.randint(3, V, (T - 1,), generator=g).tolist()],
                               prompt_len=P, sample_id=i) for i in range(B)]
    dev = torch.device(a.device)
    pilot, cop = pilot.to(dev), cop.to(dev)

    def diagnostics() -> None:
        teacher_forced_diagnostics(pilot, tap, cop, samples, pad_id=0, topk=a.topk,
                                   lambdas=[0.5, 1.0], fusion="probs", batch_size=B, rank=0,
                                   world=1, device=dev, chunk_mib=a.chunk_mib)

    def decoding() -> None:
        with torch.no_grad():
            fused_generate(pilot, tap, cop, [s.input_ids[:P] for s in samples],
                           lambdas=[0.0, 1.0], opts=DecodeOptions(max_new_tokens=a.new_tokens),
                           eos_id=-1, pad_id=0, device=dev)

    logits = B * T * V * 4
    target_rows = B * (T - P)
    t_diag, peak_diag = measure(diagnostics, dev)
    t_dec, peak_dec = measure(decoding, dev)
    res = {
        "vocab": V, "seq": T, "batch": B, "topk": a.topk, "chunk_mib": a.chunk_mib,
        "logits_bytes_BTV_fp32": logits,
        "target_row_logits_bytes": target_rows * V * 4,
        "diagnostics": {"seconds": round(t_diag, 2), "peak_bytes": peak_diag,
                        "peak_over_logits": round(peak_diag / logits, 3)},
        "decoding": {"seconds": round(t_dec, 2), "peak_bytes": peak_dec,
                     "peak_over_logits": round(peak_dec / logits, 3), "rows": 2 * B},
        "goal": "peak <= 2 x logits (B*T*V fp32)",
        "met": max(peak_diag, peak_dec) <= 2 * logits,
        "device": a.device,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    print(json.dumps(res, indent=2))
    print(f"diagnostics: peak {peak_diag / GIB:.2f} GiB = {res['diagnostics']['peak_over_logits']}"
          f"x the logits ({logits / GIB:.2f} GiB); decoding: peak {peak_dec / GIB:.2f} GiB")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
