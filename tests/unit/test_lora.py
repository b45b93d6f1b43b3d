"""LoRA Pilots (peft) and Pilot gradient checkpointing: adapters only where asked and only they
train; the tap logs the adapted model; the merged save is a plain HF model; checkpointing changes
neither the loss, the logged states nor the gradients."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from tcp.config import LoraConfig
from tcp.data.collate import collate
from tcp.models.lm_head import HeadOptions, use_fused_head
from tcp.models.lora import apply_lora, merge_state_dict
from tcp.models.pilot import PilotTap, decoder_layers, enable_gradient_checkpointing, pilot_forward
from tcp.training.engines import save_hf, save_hf_lora
from tests.helpers import tiny_pilot, tiny_t5, tokenized_batch

T5_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def _lora_cfg(family: str = "llama", **kw) -> LoraConfig:
    if family == "t5":
        kw.setdefault("target_modules", T5_TARGETS)
    return LoraConfig(**{"r": 4, "alpha": 8.0, "dropout": 0.0, **kw})


def _tiny(family: str, seed: int = 0, layers: int = 2):
    return tiny_t5(seed=seed, layers=layers) if family == "t5" else tiny_pilot(seed=seed,
                                                                               layers=layers)


def _randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """A non-zero adapter update (peft starts lora_B at zero, i.e. the base model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _batch(tok, seed: int = 0):
    return collate(tokenized_batch(tok, seed=seed, n=4), tok.pad_token_id)


def test_adapters_only_on_target_modules_and_only_they_train():
    model, _ = tiny_pilot(layers=3)
    base_names = {n for n, _ in model.named_parameters()}
    cfg = _lora_cfg(target_modules=["q_proj", "v_proj", "down_proj"])
    peft_model = apply_lora(model, cfg)
    from peft.tuners.lora import LoraLayer

    wrapped = [n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert sorted({n.rsplit(".", 1)[-1] for n in wrapped}) == ["down_proj", "q_proj", "v_proj"]
    assert len(wrapped) == 3 * 3  # every layer, nothing else (lm_head, embeddings untouched)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(wrapped)
    assert type(peft_model.get_output_embeddings()) is nn.Linear
    # the fused head replaces the (un-adapted) output layer of the peft model, same weight
    head = use_fused_head(peft_model)
    assert peft_model.get_output_embeddings() is head and not head.weight.requires_grad
    frozen = {n.removeprefix("base_model.model.").replace(".base_layer", "")
              for n, p in peft_model.named_parameters() if not p.requires_grad}
    assert frozen == base_names


def test_unknown_target_modules_name_what_exists():
    model, _ = tiny_t5()
    with pytest.raises(RuntimeError, match=r"\['q_proj'.*wi_0"):
        apply_lora(model, LoraConfig())  # LLaMA names on a T5


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("fused", [True, False])
def test_tap_logs_the_adapted_model(family, fused):
    """X~, pooled h, loss and top-k of the LoRA model equal those of its merged twin, and
    differ from the base model's: the Mistake Log sees the adapted Pilot."""
    base, tok = _tiny(family)
    peft_model = apply_lora(copy.deepcopy(base), _lora_cfg(family))
    _randomize_adapters(peft_model)
    merged = copy.deepcopy(peft_model).merge_and_unload()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    batch = _batch(tok)
    head = HeadOptions(topk=4, fused=fused)
    outs = []
    for m in (peft_model, merged, base):
        if fused:
            use_fused_head(m)
        tap = PilotTap(m)
        outs.append(pilot_forward(m, tap, batch, head=head))
        tap.remove()
    lora, ref, plain = outs
    for key in ("loss", "x_tilde", "pooled", "topk_probs", "topk_ids", "sample_loss"):
        torch.testing.assert_close(getattr(lora, key), getattr(ref, key), rtol=1e-4, atol=1e-5,
                                   msg=key)
    assert not torch.allclose(lora.pooled, plain.pooled, atol=1e-3)
    if family == "t5":  # X~ is the encoder output, which the adapters change too
        assert not torch.allclose(lora.x_tilde, plain.x_tilde, atol=1e-3)
    else:  # X~ is the (frozen) embedding
        torch.testing.assert_close(lora.x_tilde, plain.x_tilde)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_merge_state_dict_equals_peft_merge(family):
    base, _ = _tiny(family)
    peft_model = apply_lora(copy.deepcopy(base), _lora_cfg(family))
    _randomize_adapters(peft_model)
    mine = merge_state_dict(peft_model, dict(peft_model.state_dict()))
    theirs = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert mine.keys() == theirs.keys() == base.state_dict().keys()
    changed = 0
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(mine[k], base.state_dict()[k])
    # every adapted weight of both layers; T5: encoder 4 attention + 3 MLP, decoder 4 more
    assert changed == {"llama": 2 * 7, "t5": 2 * 7 + 2 * 11}[family]


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_merged_save_reloads_without_peft(tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    base, tok = _tiny(family)
    peft_model = apply_lora(copy.deepcopy(base), _lora_cfg(family))
    _randomize_adapters(peft_model)
    use_fused_head(peft_model)  # as in a run: the head is swapped before saving
    peft_model.eval()
    save_hf_lora(peft_model, tmp_path / "pilot", tmp_path / "pilot_adapter")
    assert not (tmp_path / "pilot.tmp").exists() and not (tmp_path / "pilot_adapter.tmp").exists()
    auto = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    reloaded = auto.from_pretrained(tmp_path / "pilot").eval()
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    adapter = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "pilot_adapter").eval()
    batch = _batch(tok)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kw = {"decoder_input_ids": ids[:, :5]} if family == "t5" else {}
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask, **kw).logits
        got = reloaded(input_ids=ids, attention_mask=mask, **kw).logits
        via_adapter = adapter(input_ids=ids, attention_mask=mask, **kw).logits
        plain = base(input_ids=ids, attention_mask=mask, **kw).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(via_adapter, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, want, atol=1e-3)
    with pytest.raises(TypeError, match="save_hf_lora"):
        save_hf(peft_model, tmp_path / "wrong")


def _checkpoint_call(layers: nn.ModuleList) -> None:
    """Checkpoint each layer's `__call__` (hooks included), as transformers < 5 did: its forward
    hooks then fire again in the backward's recompute."""
    for layer in layers:
        cls = type(layer)

        def call(self, *args, **kwargs):
            inner = super(self.__class__, self).__call__
            if self.training and torch.is_grad_enabled():
                with set_checkpoint_early_stop(False):  # recompute all, up to the hooks
                    return checkpoint(inner, *args, use_reentrant=False, **kwargs)
            return inner(*args, **kwargs)

        layer.__class__ = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": call})


def _step(model: nn.Module, tok, *, lora: bool, gc: str | None):
    """One Pilot training forward/backward with the fused head; the recorded hook calls."""
    if lora:
        torch.manual_seed(0)  # peft draws lora_A from the global generator
        model = apply_lora(model, _lora_cfg(dropout=0.0))
        _randomize_adapters(model)
    use_fused_head(model)
    layers = decoder_layers(model)
    if gc == "hf":
        enable_gradient_checkpointing(model)
    elif gc == "call":
        _checkpoint_call(layers)
    model.train()
    calls = {"layer": 0, "q_proj": 0}
    layers[0].register_forward_hook(lambda *_: calls.__setitem__("layer", calls["layer"] + 1))
    q = layers[0].self_attn.q_proj
    q.register_forward_hook(lambda *_: calls.__setitem__("q_proj", calls["q_proj"] + 1))
    tap = PilotTap(model)
    out = pilot_forward(model, tap, _batch(tok), head=HeadOptions(topk=4))
    pooled = out.pooled.clone()
    out.loss.backward()
    torch.testing.assert_close(out.pooled, pooled, rtol=0, atol=0)  # backward left it alone
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g.abs().sum() > 0 for g in grads.values())
    return out, grads, calls


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("gc", ["hf", "call"])
def test_gradient_checkpointing_changes_nothing(lora, gc):
    """Same loss, X~, pooled states, top-k and gradients with and without checkpointing, also
    when the recompute re-runs the tap's layer hooks ("call")."""
    ref, ref_grads, ref_calls = _step(tiny_pilot(layers=3)[0], tiny_pilot()[1], lora=lora,
                                      gc=None)
    out, grads, calls = _step(tiny_pilot(layers=3)[0], tiny_pilot()[1], lora=lora, gc=gc)
    assert ref_calls == {"layer": 1, "q_proj": 1}
    # the layer really was recomputed in the backward (its hooks too, in the "call" mode)
    assert calls == {"layer": 1 if gc == "hf" else 2, "q_proj": 2}
    for key in ("loss", "x_tilde", "pooled", "topk_probs", "topk_ids", "sample_loss"):
        torch.testing.assert_close(getattr(out, key), getattr(ref, key), rtol=1e-5, atol=1e-6,
                                   msg=key)
    assert grads.keys() == ref_grads.keys()
    assert all(".lora_" in n for n in grads) == lora
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
