"""LoRA Pilots through peft: adapters on the Pilot's Linear layers, and the merge that turns a
trained adapter back into a plain HF model for `final/pilot`.

`apply_lora` runs before DeepSpeed wraps the Pilot, so the engine's optimizer only ever sees the
adapter parameters and ZeRO-3 partitions adapters and (frozen) base weights alike. A Pilot that
`from_pretrained` built already partitioned (ZeRO-3 `HfDeepSpeedConfig`) takes adapters too: peft
reads layer shapes from `in_features`/`out_features` (or `ds_shape`), and the engine converts the
new, unpartitioned adapter parameters to ZeRO-3 parameters when it is built.

The PilotTap's hooks sit on the decoder layers peft leaves in place (it swaps the Linear layers
inside them), so X~ and the pooled states of the Mistake Log are those of the adapted model.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
from torch import nn

from tcp.config import LoraConfig
from tcp.models.pilot import is_encoder_decoder

ADAPTER = "default"
"""peft's adapter name; tcp trains exactly one."""
_PEFT_PREFIX = "base_model.model."
"""What a PeftModel's state-dict keys carry before the wrapped HF model's own keys."""


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """`model` (an HF causal LM or encoder-decoder) wrapped by peft with LoRA adapters on
    `cfg.target_modules`; every base weight is frozen, only the adapters require grad."""
    from peft import LoraConfig as PeftLoraConfig  # optional: only LoRA Pilots need peft
    from peft import TaskType, get_peft_model
    from transformers.pytorch_utils import Conv1D

    linears = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                      if isinstance(mod, nn.Linear | Conv1D)})
    missing = [t for t in cfg.target_modules if t not in linears]
    if missing:
        raise RuntimeError(
            f"pilot.lora.target_modules {missing} name no Linear layer of "
            f"{type(model).__name__}; its Linear layers are {linears}. Set "
            "pilot.lora.target_modules to some of those (T5: ['q','k','v','o','wi_0','wi_1','wo'])")
    task = TaskType.SEQ_2_SEQ_LM if is_encoder_decoder(model) else TaskType.CAUSAL_LM
    peft_cfg = PeftLoraConfig(task_type=task, r=cfg.r, lora_alpha=cfg.alpha,
                              lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules),
                              bias="none")
    with warnings.catch_warnings():  # peft reads HF's deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        # Adapters in the base weights' dtype: DeepSpeed (bf16/fp16) expects one dtype across
        # the module and keeps its own fp32 master copies of what trains.
        return get_peft_model(model, peft_cfg, autocast_adapter_dtype=False)


def is_peft(model: nn.Module) -> bool:
    """True for a peft-wrapped model (also through a DeepSpeed engine)."""
    from peft import PeftModel  # optional: only LoRA Pilots need peft

    return isinstance(getattr(model, "module", model), PeftModel)


def lora_layers(model: nn.Module) -> dict[str, Any]:
    """The adapted Linear layers of a peft model by state-dict prefix (`base_model.model....`)."""
    from peft.tuners.lora import Linear as LoraLinear  # optional: only LoRA Pilots need peft
    from peft.tuners.lora import LoraLayer

    found = {name: mod for name, mod in model.named_modules() if isinstance(mod, LoraLayer)}
    for name, mod in found.items():
        if not isinstance(mod, LoraLinear) or mod.use_dora.get(ADAPTER, False):
            raise RuntimeError(f"{name}: tcp merges plain LoRA on Linear layers only, not "
                               f"{type(mod).__name__}; keep pilot.lora.target_modules to Linears")
    return found


def adapter_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter entries of a peft model's full state dict `sd` (keys unchanged)."""
    keys = {f"{name}.{part}.{ADAPTER}.weight" for name in lora_layers(model)
            for part in ("lora_A", "lora_B")}
    return {k: v for k, v in sd.items() if k in keys}


def merge_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The wrapped HF model's own state dict with every adapter merged, W + (alpha/r) B A,
    from the peft model's full state dict `sd` (gathered under ZeRO-3).

    `sd` is consumed (entries are popped as they are merged), so rank 0 holds about one model,
    never two. The keys are those the un-adapted HF model has, so `from_pretrained` needs no peft.
    """
    for name, mod in lora_layers(model).items():
        a = sd.pop(f"{name}.lora_A.{ADAPTER}.weight").float()
        b = sd.pop(f"{name}.lora_B.{ADAPTER}.weight").float()
        delta = (b @ a) * float(mod.scaling[ADAPTER])
        if mod.fan_in_fan_out:  # GPT-2 Conv1D stores the weight transposed
            delta = delta.T
        key = f"{name}.base_layer.weight"
        w = sd.pop(key)
        sd[key] = (w.float() + delta).to(w.dtype)
    strays = [k for k in sd if re.search(r"\.lora_\w+\.", k)]
    if strays:
        raise RuntimeError(f"unmerged adapter entries {strays[:3]}: peft added state tcp does "
                           "not know how to merge")
    return {k.removeprefix(_PEFT_PREFIX).replace(".base_layer.", "."): v for k, v in sd.items()}
