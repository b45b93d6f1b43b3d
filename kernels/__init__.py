"""tcp.kernels: one op per module, each with a pure-torch reference that is a selectable backend.

Installed as `tcp.kernels` (never a top-level `kernels`, which would shadow Hugging Face's package
of that name). Nothing here imports from the rest of `tcp`.

Ops so far:
- `copilot_loss`: the Copilot's per-sequence RMSE against the sparse error target (torch
  reference; the fused Triton kernel that never materialises f is tracked in its own issue).
"""
