"""Decode-time benchmark: Pilot alone vs Pilot + Copilot (fused greedy decoding, KV caches).

    python tools/bench_decode.py                     # the default config's shapes (tiny)
    python tools/bench_decode.py --preset mid        # d=512 x 8 Pilot, V=32k: a larger ratio test
    python tools/bench_decode.py --device cuda --dtype bfloat16 --preset mid

Reports seconds per generated token for (a) HF `generate` of the Pilot alone, (b) tcp's decoding
loop without a Copilot, (c) with the Copilot, and the goal of issue 6:
time(c) / time(a) <= 1.1 * (1 + Copilot FLOPs / Pilot FLOPs) per token, FLOPs counted by
`flops_per_token` (matmuls 2 * m * n, attention 4 * d * context per layer; the Copilot's
input projection of its own dense previous f is a V x d_C matmul, counted).
Weights are random (time does not depend on them); EOS is disabled so every row decodes exactly
--new-tokens tokens. Prefill (the prompt) is excluded: it is timed separately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PRESETS = {
    # name: (pilot d, layers, inter, heads, copilot d, layers, inter, heads, vocab)
    "default": (128, 4, 344, 4, 128, 4, 344, 4, 100),
    "mid": (512, 8, 1376, 8, 256, 4, 688, 4, 32000),
}


def flops_per_token(*, d: int, layers: int, inter: int, vocab: int, context: int,
                    kv_heads_ratio: float = 1.0) -> float:
    """Pilot (LLaMA block) forward FLOPs for one new token at `context` cached positions."""
    attn_proj = 2 * d * d * (2 + 2 * kv_heads_ratio)  # q, o + k, v
    mlp = 2 * 3 * d * inter
    attn = 4 * d * context
    return layers * (attn_proj + mlp + attn) + 2 * d * vocab


def copilot_flops_per_token(*, d: int, layers: int, inter: int, vocab: int, d_pilot: int,
                            context: int, memory: int) -> float:
    """Copilot step FLOPs: dense f_{i-1} projection, alternating self/cross layers, the head."""
    total = 2 * vocab * d + 2 * d_pilot * d  # error projection, memory projection of h_i
    for i in range(layers):
        cross = i % 2 == 1
        total += 2 * d * d * 4 + 2 * 3 * d * inter + 4 * d * (memory if cross else context)
    return total + 2 * d * vocab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="default")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from tcp.config import ArchConfig, CopilotConfig
    from tcp.evaluation.decoding import DecodeOptions, fused_generate
    from tcp.models.copilot import Copilot
    from tcp.models.pilot import PilotTap, build_llama

    pd, pl, pi, ph, cd, cl, ci, ch, V = PRESETS[args.preset]
    dev, dt = torch.device(args.device), getattr(torch, args.dtype)
    pilot = build_llama(ArchConfig(hidden_size=pd, intermediate_size=pi, num_layers=pl,
                                   num_heads=ph, max_position_embeddings=1024),
                        vocab_size=V, pad_id=0, bos_id=1, eos_id=2, seed=0).to(dev, dt).eval()
    copilot = Copilot(CopilotConfig(hidden_size=cd, intermediate_size=ci, num_layers=cl,
                                    num_heads=ch, init_from="none"),
                      vocab_size=V, pilot_hidden=pd).to(dev, dt).eval()
    with torch.no_grad():
        copilot.head.weight.normal_(0, 0.02)  # a trained-looking head (zero-init is a no-op)
    tap = PilotTap(pilot)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch)]
    T = args.new_tokens

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def hf() -> None:
        ids = torch.tensor(prompts, device=dev)
        pilot.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T,
                       min_new_tokens=T, do_sample=False, pad_token_id=0, eos_token_id=None)

    def ours(cop: Copilot | None, steps: int) -> None:
        fused_generate(pilot, tap, cop, prompts, lambdas=[1.0], eos_id=-1, pad_id=0,
                       device=dev, opts=DecodeOptions(max_new_tokens=steps))

    variants = {
        "pilot_tcp_1": lambda: ours(None, 1), "pilot_tcp": lambda: ours(None, T),
        "copilot_1": lambda: ours(copilot, 1), "pilot+copilot": lambda: ours(copilot, T),
        "pilot_hf": hf,
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(args.repeats):  # interleaved rounds: drift hits every variant alike
            for name, fn in variants.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                samples[name].append(time.perf_counter() - t0)
    t = {k: statistics.median(v) for k, v in samples.items()}
    # Per generated token: (T tokens - 1 token) / (T - 1), so the prompt's prefill cancels; HF
    # generate runs the same prompt forward, so tcp's prefill is subtracted from it too.
    res = {
        "pilot_hf": {"total_s": t["pilot_hf"],
                     "per_token_s": (t["pilot_hf"] - t["pilot_tcp_1"]) / (T - 1)},
        "pilot_tcp": {"total_s": t["pilot_tcp"],
                      "per_token_s": (t["pilot_tcp"] - t["pilot_tcp_1"]) / (T - 1)},
        "pilot+copilot": {"total_s": t["pilot+copilot"],
                          "per_token_s": (t["pilot+copilot"] - t["copilot_1"]) / (T - 1)},
    }
    ctx = args.prompt_len + T // 2
    fp = flops_per_token(d=pd, layers=pl, inter=pi, vocab=V, context=ctx)
    fc = copilot_flops_per_token(d=cd, layers=cl, inter=ci, vocab=V, d_pilot=pd, context=T // 2,
                                 memory=ctx)
    goal = 1.1 * (1 + fc / fp)
    ratio_hf = res["pilot+copilot"]["per_token_s"] / res["pilot_hf"]["per_token_s"]
    ratio_tcp = res["pilot+copilot"]["per_token_s"] / res["pilot_tcp"]["per_token_s"]
    print(f"preset={args.preset} device={dev.type} dtype={args.dtype} batch={args.batch} "
          f"prompt={args.prompt_len} new_tokens={T} threads={torch.get_num_threads()}")
    print(f"Pilot d={pd} L={pl} | Copilot d={cd} L={cl} | V={V}")
    for name, r in res.items():
        print(f"  {name:14s} {1e3 * r['per_token_s']:8.3f} ms/token (batch of {args.batch}); "
              f"total {r['total_s']:.3f} s")
    print(f"FLOPs/token: Pilot {fp / 1e6:.2f} M, Copilot {fc / 1e6:.2f} M "
          f"(ratio {fc / fp:.3f}); goal <= {goal:.3f}x")
    print(f"time ratio with Copilot: {ratio_hf:.3f}x vs HF generate, {ratio_tcp:.3f}x vs tcp's "
          f"loop without Copilot -> goal {'met' if ratio_hf <= goal else 'MISSED'}")


if __name__ == "__main__":
    main()
