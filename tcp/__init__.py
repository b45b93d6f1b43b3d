"""tcp: Transformer Copilot at cluster scale (Pilot + Mistake Log + Copilot on DeepSpeed)."""

__version__ = "0.1.0"
