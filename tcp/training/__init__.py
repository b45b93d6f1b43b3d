"""Training jobs: the joint run and the offline run, building the engines, the Trainer and the
Copilot update, checkpoints, the base phase, the memory plan."""
