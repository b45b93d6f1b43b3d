"""One rank of the ZeRO-3 fused-vs-eager gradient check (run by test_fused_zero3.py).

Builds the same tiny Pilot twice (one with the fused LM head) and the same Copilot twice, wraps
each in its own ZeRO-3 engine (every parameter partitioned), runs one forward/backward of each on
this rank's batch, gathers every full gradient and writes the largest differences to a JSON file
(rank 0).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# The repository root after site-packages, so `tests.helpers` imports and our `kernels/` folder
# never shadows the `kernels` distribution transformers imports (tests/conftest.py).
sys.path.append(str(Path(__file__).resolve().parents[2]))

import deepspeed
import torch
import torch.distributed as dist

from tcp.config import RunConfig, render_deepspeed
from tcp.data.collate import collate
from tcp.models.copilot import ErrorTarget
from tcp.models.copilot_inputs import build_inputs
from tcp.models.lm_head import HeadOptions, use_fused_head
from tcp.models.log_entries import collect
from tcp.models.pilot import PilotTap, pilot_forward
from tcp.runtime.process_group import init_distributed
from tcp.training.engines import build_engine
from tests.helpers import tiny_copilot, tiny_pilot, tokenized_batch


def full_grads(engine) -> dict[str, torch.Tensor]:
    return {n: deepspeed.utils.safe_get_full_grad(p).clone()
            for n, p in engine.module.named_parameters()}


def main(out_path: str) -> None:
    rank, world, device = init_distributed(600)
    cfg = RunConfig()
    ds = render_deepspeed(cfg, "pilot", world_size=world)
    topk = 5
    results: dict[str, float] = {}
    steps = {}
    grads = {}
    for fused in (False, True):
        model, tok = tiny_pilot(seed=3, d=48, layers=3)
        model.train()
        if fused:
            use_fused_head(model)
        tap = PilotTap(model, impl="auto")
        engine = build_engine(model, ds)
        batch = {k: v.to(device) for k, v in collate(tokenized_batch(tok, rank), tok.pad_token_id)
                 .items()}
        out = pilot_forward(engine, tap, batch, head=HeadOptions(topk=topk, fused=fused))
        engine.backward(out.loss)
        grads[fused] = full_grads(engine)
        steps[fused] = out
    e, f = steps[False], steps[True]
    results["pilot_loss"] = abs(float(e.loss) - float(f.loss))
    results["pilot_topk_probs"] = float((e.topk_probs - f.topk_probs).abs().max())
    results["pilot_topk_ids_equal"] = float(bool((e.topk_ids == f.topk_ids).all()))
    results["pilot_pooled"] = float((e.pooled - f.pooled).abs().max())
    results["pilot_grad"] = max(float((grads[False][n] - g).abs().max() /
                                      grads[False][n].abs().max().clamp_min(1e-12))
                                for n, g in grads[True].items())
    results["pilot_grad_params"] = float(len(grads[True]))
    results["pilot_partitioned"] = float(all(hasattr(p, "ds_id")
                                             for p in engine.module.parameters()))

    entries = collect(f, topk=topk, step=0, rank=rank, sample_id=batch["sample_id"],
                      device=device)
    cds = render_deepspeed(cfg, "copilot", world_size=world)
    losses, cgrads = {}, {}
    for fused in (False, True):
        torch.manual_seed(7)  # the same Copilot (random head) both times
        cop = tiny_copilot(len(tok), 48, d=32, layers=2, randomize_head=True).train()
        cengine = build_engine(cop, cds)
        inputs = build_inputs(entries, device)
        loss, _ = cengine(inputs, target=ErrorTarget.from_batch(entries, device, fused=fused))
        cengine.backward(loss)
        losses[fused] = float(loss)
        cgrads[fused] = full_grads(cengine)
    results["copilot_loss"] = abs(losses[False] - losses[True])
    results["copilot_grad"] = max(float((cgrads[False][n] - g).abs().max() /
                                        cgrads[False][n].abs().max().clamp_min(1e-12))
                                  for n, g in cgrads[True].items())
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh)
    # Leave together: a rank that exits while the other still holds the gloo group can abort
    # ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[-1])
