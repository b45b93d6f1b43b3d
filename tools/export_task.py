"""Write a built-in task's splits as JSONL files: the records a run generates, for reading or
for training through the user-data path.

    python tools/export_task.py choice --out data/choice            # seed 0, default sizes
    deepspeed --num_gpus 2 launcher/train.py --config configs/choice.yaml data.source=jsonl \\
        data.train_path=data/choice/train.jsonl data.val_path=data/choice/validation.jsonl \\
        data.test_path=data/choice/test.jsonl

Each line is {"prompt", "answer", "op"}: exactly what `data.source=<task>` trains and
evaluates on with the same seed and sizes (tcp.data.families), so a run on the files matches a
run on the generator. Tasks: arithmetic (the default), multistep, choice, yesno.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tcp.config.data import BUILTIN, DataConfig
from tcp.data import families


def export(task: str, out: Path, *, seed: int, sizes: dict[str, int]) -> dict[str, Path]:
    """Write `<out>/<split>.jsonl` for each split of `sizes`; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, size in sizes.items():
        path = out / f"{split}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as f:
            for rec in families.generate(task, seed, split, size):
                f.write(json.dumps(rec) + "\n")
        tmp.replace(path)
        files[split] = path
    return files


def _positive(text: str) -> int:
    n = int(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {n})")
    return n


def main(argv: list[str] | None = None) -> int:
    d = DataConfig()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=BUILTIN, help="the built-in task")
    ap.add_argument("--out", type=Path, required=True, help="folder for the .jsonl files")
    ap.add_argument("--seed", type=int, default=0, help="the run seed (default %(default)s)")
    ap.add_argument("--train-size", type=_positive, default=d.train_size,
                    help="training problems (default %(default)s, as data.train_size)")
    ap.add_argument("--val-size", type=_positive, default=d.val_size,
                    help="validation problems (default %(default)s)")
    ap.add_argument("--test-size", type=_positive, default=d.test_size,
                    help="test problems (default %(default)s)")
    args = ap.parse_args(argv)
    sizes = {"train": args.train_size, "validation": args.val_size, "test": args.test_size}
    try:
        files = export(args.task, args.out, seed=args.seed, sizes=sizes)
    except ValueError as e:
        msg = str(e).replace("data.train_size", "--train-size").replace(
            "data.val_size", "--val-size").replace("data.test_size", "--test-size")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    for split, path in files.items():
        print(f"{split}: {sizes[split]} records -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
