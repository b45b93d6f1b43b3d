"""Console entry points: tcp-train (launcher/train.py), tcp-eval, tcp-launch, tcp-log. Thin:
parse, call the library, map errors to exit codes."""
