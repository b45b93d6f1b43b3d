"""Entry point: `deepspeed --num_gpus N launcher/train.py --config configs/<name>.yaml [k=v ...]`.

Thin on purpose: everything lives in `tcp.cli.tcp_train` / `tcp.training.joint_job`.
"""

import sys

from tcp.cli.tcp_train import train_main

if __name__ == "__main__":
    sys.exit(train_main())
