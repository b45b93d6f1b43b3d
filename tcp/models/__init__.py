"""Models: the Pilot (any HF causal LM + a tap for the Mistake Log) and the Copilot."""
