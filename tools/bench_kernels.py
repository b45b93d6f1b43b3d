"""Benchmark the fused kernels against the eager paths: forward, backward, peak memory.

    python tools/bench_kernels.py                              # CPU, torch reference backends
    python tools/bench_kernels.py --device cuda --dtype bfloat16   # GPU, Triton kernels

Ops:
- copilot_loss: eager = f = h W^T + b materialised, then the RMSE on it (tcp's unfused path);
  fused = `fused_copilot_rmse_loss` (chunks of whole sequences, no (N, V) f).
- pilot_loss: eager = full logits, cross-entropy and top-k from them (the unfused path);
  fused = `fused_linear_cross_entropy`.
- pooling: eager = torch.stack of the L gathered layer rows, then mean (what
  `output_hidden_states` pooling does); fused = `pool_layer_` per layer. On CUDA also reports the
  fused kernel's bandwidth against a device-to-device copy of the same number of bytes.
- gram (with --gram): forward of the Gram route of docs/method.md §5 (||f||^2 = h^T (W^T W) h), the
  alternative to chunking, timed and checked for cancellation at a small loss. Not shipped; this
  is the measurement behind that decision.

Peak memory: on CUDA, max_memory_allocated above what the inputs hold; on CPU each measurement
runs in a fresh subprocess and reports the peak resident set (VmHWM, reset after the inputs are
built) above the resident set after set-up. Times are the median of --repeats runs after one
warm-up (--warmup 0 skips it, for slow CPU sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from tcp.kernels.copilot_loss import copilot_rmse_loss, fused_copilot_rmse_loss
from tcp.kernels.pilot_loss import fused_linear_cross_entropy, linear_cross_entropy
from tcp.kernels.pooling import layer_mean_pool

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- measurement
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak(dev: torch.device) -> int:
    """Reset the peak counter; returns the current usage in bytes (the baseline)."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _rss_kib("VmRSS") * 1024


def _peak(dev: torch.device) -> int:
    if dev.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_kib("VmHWM") * 1024


def measure(fwd: Callable[[], torch.Tensor | None], leaves: list[torch.Tensor],
            dev: torch.device, *, repeats: int, warmup: int) -> dict[str, float]:
    """Median forward and backward seconds, and peak bytes above the inputs."""
    def once() -> tuple[float, float]:
        for t in leaves:
            t.grad = None
        _sync(dev)
        t0 = time.perf_counter()
        loss = fwd()
        _sync(dev)
        t1 = time.perf_counter()
        if loss is not None and leaves:
            loss.backward()
        _sync(dev)
        return t1 - t0, time.perf_counter() - t1

    for _ in range(warmup):
        once()
    for t in leaves:
        t.grad = None
    base = _reset_peak(dev)
    runs = [once() for _ in range(repeats)]
    peak = _peak(dev) - base
    return {"fwd_s": statistics.median(r[0] for r in runs),
            "bwd_s": statistics.median(r[1] for r in runs), "peak_bytes": float(max(peak, 0))}


# ----------------------------------------------------------------------------- problems
def copilot_case(path: str, a: argparse.Namespace, V: int, dev: torch.device):
    dt = DTYPES[a.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    N, d, k, S = a.tokens, a.dim, a.topk, max(1, a.tokens // 64)
    h = torch.randn(N, d, generator=g).to(dev, dt).requires_grad_()
    W = (torch.randn(V, d, generator=g) * d**-0.5 * 0.1).to(dev, dt).requires_grad_()
    b = torch.zeros(V).to(dev, dt).requires_grad_()
    labels = torch.randint(V, (N,), generator=g).to(dev)
    top_i = torch.randint(V, (N, k), generator=g).to(dev)
    top_p = (torch.rand(N, k, generator=g) / k).to(dev)
    seq = (torch.arange(N) * S // N).to(dev)
    if path == "eager":
        def fwd():
            return copilot_rmse_loss(F.linear(h, W, b), labels, top_i, top_p, seq, S)[0]
    else:
        def fwd():
            return fused_copilot_rmse_loss(h, W, b, labels, top_i, top_p, seq, S, impl=a.impl,
                                           chunk_mib=a.chunk_mib)[0]
    return fwd, [h, W, b]


def pilot_case(path: str, a: argparse.Namespace, V: int, dev: torch.device):
    dt = DTYPES[a.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(a.tokens, a.dim, generator=g).to(dev, dt).requires_grad_()
    W = (torch.randn(V, a.dim, generator=g) * a.dim**-0.5).to(dev, dt).requires_grad_()
    y = torch.randint(V, (a.tokens,), generator=g).to(dev)
    if path == "eager":
        def fwd():
            return linear_cross_entropy(h, W, y, topk=a.topk).loss
    else:
        def fwd():
            return fused_linear_cross_entropy(h, W, y, topk=a.topk, impl=a.impl,
                                              chunk_mib=a.chunk_mib).loss
    return fwd, [h, W]


def pooling_case(path: str, a: argparse.Namespace, V: int, dev: torch.device):
    dt = DTYPES[a.dtype]
    B = max(1, a.tokens // 128)
    T = 2 * a.tokens // B  # half the positions are target-producing
    states = [torch.randn(B, T, a.dim, device=dev).to(dt) for _ in range(a.layers)]
    rows = torch.randperm(B * T, device=dev)[: a.tokens].sort().values
    if path == "eager":
        def fwd():
            flat = [s.reshape(-1, a.dim)[rows] for s in states]
            torch.stack(flat).float().mean(0).to(dt)
    else:
        def fwd():
            layer_mean_pool(states, rows, out_dtype=dt, impl=a.impl)
    return fwd, []


CASES = {"copilot_loss": copilot_case, "pilot_loss": pilot_case, "pooling": pooling_case}


def run_case(op: str, path: str, a: argparse.Namespace, V: int) -> dict[str, float]:
    dev = torch.device(a.device)
    fwd, leaves = CASES[op](path, a, V, dev)
    return measure(fwd, leaves, dev, repeats=a.repeats, warmup=a.warmup)


def run_isolated(op: str, path: str, a: argparse.Namespace, V: int) -> dict[str, float]:
    """On CPU: one measurement per fresh process, so peak RSS is this case's alone."""
    if a.device == "cuda":
        torch.cuda.empty_cache()
        return run_case(op, path, a, V)
    cmd = [sys.executable, __file__, "--child", op, path, str(V), *a.argv]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{op}/{path} V={V} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- extras
def pooling_bandwidth(a: argparse.Namespace) -> dict[str, float]:
    """Fused pooling's bytes/s (everything it reads and writes) vs a D2D copy (CUDA)."""
    dev = torch.device("cuda")
    dt = DTYPES[a.dtype]
    fwd, _ = pooling_case("fused", a, 0, dev)
    el, eb = a.tokens * a.dim, torch.tensor([], dtype=dt).element_size()
    L = a.layers
    moved = L * el * eb + el * 4 + max(L - 2, 0) * el * 8 + (el * 4 + el * eb if L > 1 else 0)
    t = _cuda_time(fwd, a.repeats)
    src = torch.empty(moved // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy = _cuda_time(lambda: dst.copy_(src), a.repeats)
    return {"bytes": float(moved), "fused_GBps": moved / t / 1e9,
            "copy_GBps": 2 * src.numel() / t_copy / 1e9, "ratio": (moved / t) /
            (2 * src.numel() / t_copy)}


def _cuda_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(max(repeats, 5)):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def gram_route(a: argparse.Namespace, V: int) -> dict[str, float]:
    """Forward time of the Gram route, and its relative error at a small loss vs the chunked
    route (both against float64), on a problem where f = ell + 1e-4 noise."""
    dev = torch.device(a.device)
    dt = DTYPES[a.dtype]
    g = torch.Generator(device="cpu").manual_seed(0)
    N, d = a.tokens, a.dim
    h = torch.randn(N, d, generator=g).to(dev, dt)
    W = (torch.randn(V, d, generator=g) * d**-0.5 * 0.1).to(dev, dt)

    def gram_sq() -> torch.Tensor:
        G = W.t() @ W  # (d, d)
        return ((h @ G) * h).float().sum(-1)  # ||f||^2 per token; the sparse part is O(k)

    _sync(dev)
    t0 = time.perf_counter()
    gram_sq()
    _sync(dev)
    t_gram = time.perf_counter() - t0
    # cancellation: ||f - ell||^2 = ||f||^2 - 2 f.ell + ||ell||^2 at f = ell + eps
    n, v = 256, 257
    ell = torch.zeros(n, v, dtype=torch.float64)
    ell[torch.arange(n), torch.randint(v, (n,), generator=g)] = 1.0
    ell -= torch.rand(n, v, generator=g, dtype=torch.float64).softmax(-1)
    f64 = ell + 1e-4 * torch.randn(n, v, generator=g, dtype=torch.float64)
    truth = ((f64 - ell) ** 2).sum(-1)
    f32, e32 = f64.float(), ell.float()
    expanded = (f32 * f32).sum(-1) - 2 * (f32 * e32).sum(-1) + (e32 * e32).sum(-1)
    direct = ((f32 - e32) ** 2).sum(-1)
    rel = lambda x: float(((x.double() - truth).abs() / truth).median())  # noqa: E731
    return {"gram_fwd_s": t_gram, "expanded_rel_err": rel(expanded), "direct_rel_err": rel(direct)}


# ----------------------------------------------------------------------------- main
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="copilot_loss,pilot_loss,pooling",
                   help="comma-separated: copilot_loss, pilot_loss, pooling")
    p.add_argument("--vocab", default="32000,128256", help="comma-separated vocabulary sizes")
    p.add_argument("--tokens", type=int, default=4096, help="N, target tokens per call")
    p.add_argument("--dim", type=int, default=1024, help="d, the head's input width")
    p.add_argument("--topk", type=int, default=16, help="k of the sparse error / top-k")
    p.add_argument("--layers", type=int, default=32, help="L for pooling")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--impl", choices=["auto", "torch", "triton"], default="auto",
                   help="fused backend (auto: Triton on CUDA, torch on CPU)")
    p.add_argument("--chunk-mib", type=float, default=64.0, dest="chunk_mib")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--gram", action="store_true", help="also time the Gram route (see above)")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--child", nargs=3, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    torch.manual_seed(0)
    if a.child:
        op, path, V = a.child
        print(json.dumps(run_case(op, path, a, int(V))))
        return
    a.argv = _strip(argv, "--json", "--gram")
    rows = []
    where = (torch.cuda.get_device_name() if a.device == "cuda" else
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"# bench_kernels on {a.device} ({where}), torch {torch.__version__}, {a.dtype}, "
          f"N={a.tokens} d={a.dim} k={a.topk} L={a.layers} impl={a.impl} "
          f"chunk={a.chunk_mib} MiB")
    print(f"{'op':13}{'V':>8} {'path':7}{'fwd s':>9}{'bwd s':>9}{'total s':>9}{'peak MiB':>10}"
          f"{'time x':>8}{'mem x':>8}")
    for op in a.ops.split(","):
        vocabs = [0] if op == "pooling" else [int(v) for v in a.vocab.split(",")]
        for V in vocabs:
            eager = run_isolated(op, "eager", a, V)
            fused = run_isolated(op, "fused", a, V)
            for path, r in (("eager", eager), ("fused", fused)):
                tot = r["fwd_s"] + r["bwd_s"]
                tx = tot / (eager["fwd_s"] + eager["bwd_s"])
                mx = r["peak_bytes"] / max(eager["peak_bytes"], 1.0)
                print(f"{op:13}{V or '-':>8} {path:7}{r['fwd_s']:9.3f}{r['bwd_s']:9.3f}"
                      f"{tot:9.3f}{r['peak_bytes'] / 2**20:10.1f}{tx:8.2f}{mx:8.3f}", flush=True)
                rows.append({"op": op, "vocab": V, "path": path, **r})
    extras: dict[str, object] = {}
    if a.device == "cuda" and "pooling" in a.ops:
        extras["pooling_bandwidth"] = bw = pooling_bandwidth(a)
        print(f"pooling bandwidth: fused {bw['fused_GBps']:.0f} GB/s vs device copy "
              f"{bw['copy_GBps']:.0f} GB/s of the same bytes: {bw['ratio']:.2f}x")
    if a.gram:
        for V in [int(v) for v in a.vocab.split(",")]:
            extras[f"gram_{V}"] = gr = gram_route(a, V)
            print(f"gram route V={V}: forward {gr['gram_fwd_s']:.3f} s; at a small loss, "
                  f"median relative error of ||f-ell||^2 in fp32: expanded "
                  f"{gr['expanded_rel_err']:.1e} vs direct {gr['direct_rel_err']:.1e}")
    if a.json:
        a.json.write_text(json.dumps({"args": argv, "device": where, "rows": rows, **extras},
                                     indent=1))


def _strip(argv: list[str], *flags: str) -> list[str]:
    """argv without the given flags (and --json's value), for the child processes."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x in flags:
            skip = x == "--json"
            continue
        out.append(x)
    return out


if __name__ == "__main__":
    main()
