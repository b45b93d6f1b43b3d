"""Multi-node launching on loopback: two DeepSpeed runners, one per "node", started the way a
cluster without ssh starts them (`--hostfile`, `--no_ssh`, `--node_rank`, `--master_addr`), one
CPU rank each (world size 2). One node dies after the step-4 checkpoint; the other must fail
within the collective timeout instead of hanging, leaving no process behind; both resumed with
resume=auto end exactly where an uninterrupted single-node 2-rank run ends.

What the DeepSpeed runner (0.19) does with --no_ssh, which the commands here rely on:
- each host name may appear once in the hostfile, so the two "nodes" are `localhost` and
  `127.0.0.1`; with --no_ssh the names only order the ranks (node_rank 0 gets global rank 0);
- --master_addr is required: without it the runner asks the first host over ssh
  (`ssh localhost hostname -I`) even under --no_ssh;
- the runner forwards no signal to its children on this path (the ranks notice its exit and
  stop with a checkpoint: tcp.runtime.preemption.LauncherWatch, tested in test_operations.py), and a
  launch process killed by a signal makes the runner exit 0. A node is killed here by fault
  injection in its rank; each node runs in its own session so that nothing of it survives.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed.test_resume import STEPS, TINY, assert_same_run
from tests.helpers import JOINT_ONLY, ROOT, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HOSTFILE = "localhost slots=1\n127.0.0.1 slots=1\n"
MICRO = int(next(o.split("=", 1)[1] for o in TINY
                 if o.startswith("train.pilot.micro_batch_size=")))
TIMEOUT_S = 20  # train.collective_timeout_s: a rank waiting on a dead peer fails, not hangs
OVERRIDES = (*TINY, f"train.collective_timeout_s={TIMEOUT_S}")
KILL_NODE1 = "kill@step=6:rank=1"  # after the step-4 checkpoint, before the step-8 one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One node's `deepspeed --hostfile ... --no_ssh --node_rank N` runner, in its own session
    (process group id == its pid), stdout and stderr to `<log>`."""

    def __init__(self, rank: int, run: Path, hostfile: Path, port: int, log: Path,
                 *overrides: str, env: dict[str, str] | None = None) -> None:
        deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
        cmd = [deepspeed, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(ROOT / "launcher/train.py"), "--config", str(ROOT / "configs/default.yaml"),
               JOINT_ONLY, f"output_dir={run}", f"tracking.uri=sqlite:///{run}.db", *overrides]
        full_env = {k: v for k, v in os.environ.items() if k != "TCP_FAULT_INJECT"}
        full_env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})})
        self.rank, self.log = rank, log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=run.parent, env=full_env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.pgid = self.proc.pid

    def wait(self, timeout: float, others: list["Node"]) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node {self.rank} still running after {timeout:.0f}s\n{tails(others)}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def survivors(self) -> list[str]:
        """Live (non-zombie) processes left in this node's process group."""
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return []
        left = []
        for p in psutil.process_iter(["pid", "status", "cmdline"]):
            try:
                if os.getpgid(p.pid) == self.pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    left.append(f"{p.pid}: {' '.join(p.info['cmdline'] or [])[:160]}")
            except (OSError, psutil.Error):
                pass
        return left

    def kill(self) -> None:
        """SIGKILL the whole node (runner, launch, rank); no-op when it is gone."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)


def tails(nodes: list[Node], n: int = 30) -> str:
    out = []
    for node in nodes:
        lines = node.output().splitlines()
        out.append(f"--- node {node.rank} (rc={node.proc.returncode}), last {n} lines of "
                   f"{node.log}:\n" + "\n".join(line[:300] for line in lines[-n:]))
    return "\n".join(out)


def start(run: Path, hostfile: Path, tag: str, *extra: str,
          node1_env: dict[str, str] | None = None) -> list[Node]:
    port = free_port()
    return [Node(r, run, hostfile, port, run.parent / f"{tag}_node{r}.log", *OVERRIDES, *extra,
                 env=node1_env if r == 1 else None) for r in (0, 1)]


def assert_nothing_left(nodes: list[Node], grace: float = 10.0) -> None:
    deadline = time.time() + grace
    while (left := [s for node in nodes for s in node.survivors()]) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, "processes left alive:\n" + "\n".join(left) + "\n" + tails(nodes)


def assert_log_complete(run: Path) -> None:
    """Both ranks' shards verify and hold every (step, sample) of the run exactly once."""
    from tcp.mistake_log.maintenance import verify
    from tcp.mistake_log.reader import RankStoreReader

    root = run / "mistake_log"
    assert sorted(p.name for p in root.glob("rank*")) == ["rank00000", "rank00001"]
    rep = verify(root)
    assert rep.ok, rep.summary()
    for rank in (0, 1):
        reader = RankStoreReader(root, rank)
        b = reader.read_range(0, reader.num_entries)
        pairs = list(zip(b.step.tolist(), b.sample_id.tolist(), strict=True))
        assert len(pairs) == len(set(pairs)) == STEPS * MICRO, (rank, len(pairs), len(set(pairs)))
        steps = sorted({s for s, _ in pairs})
        assert len(steps) == STEPS, (rank, steps)


def test_two_nodes_lose_one_fail_fast_and_resume_exactly(tmp_path):
    t0 = time.time()
    continuous = tmp_path / "continuous" / "run"
    continuous.parent.mkdir()
    launch(continuous, *TINY)  # one node, `deepspeed --num_gpus 2`
    t_continuous = time.time() - t0

    run = tmp_path / "nodes" / "run"
    run.parent.mkdir()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(HOSTFILE)
    started: list[Node] = []
    try:
        # 1. Two nodes; rank 1 (node 1's only rank) SIGKILLs itself during step 6, after the
        # step-4 checkpoint. Node 1's launcher then exits, taking the node down; node 0's rank
        # loses its peer inside a collective and must fail, not hang.
        nodes = start(run, hostfile, "killed", node1_env={"TCP_FAULT_INJECT": KILL_NODE1})
        started += nodes
        node0, node1 = nodes
        rc1 = node1.wait(240, nodes)
        t_dead = time.time()
        rc0 = node0.wait(3 * TIMEOUT_S, nodes)
        waited = time.time() - t_dead
        assert rc1 != 0 and rc0 != 0, tails(nodes)
        assert waited < 3 * TIMEOUT_S, (waited, tails(nodes))
        assert "[joint] 2/8" in node0.output(), tails(nodes)  # it did train jointly
        assert_nothing_left(nodes)
        assert not (run / "results.json").exists()
        assert (run / "checkpoints/latest").read_text().strip() == "step_00000004"
        t_killed = time.time() - t0 - t_continuous

        # 2. Both nodes again, resume=auto, same commands on a new port.
        nodes = start(run, hostfile, "resumed", "resume=auto")
        started += nodes
        node0, node1 = nodes
        rcs = [node.wait(240, nodes) for node in nodes]
        assert rcs == [0, 0], tails(nodes)
        assert_nothing_left(nodes)
        out = node0.output()
        assert "resumed from" in out and "step_00000004 at step 4" in out, tails(nodes)
        assert (run / "results.json").exists()
        assert_log_complete(run)

        # 3. The history of the two-node run, killed and resumed, is the uninterrupted
        # single-node run's: the hostfile launch changes the rank layout, not the numbers.
        ha, hb = (json.loads((r / "results.json").read_text())["history"]
                  for r in (continuous, run))
        assert [x["step"] for x in ha] == [x["step"] for x in hb]
        for x, y in zip(ha, hb, strict=True):
            for key in ("pilot_loss", "copilot_rmse"):
                assert abs(x[key] - y[key]) <= 1e-6, (x["step"], key, x[key], y[key])
        # ...and so are its final weights, step-8 engine checkpoints and Mistake Log contents.
        assert_same_run(continuous, run)
        print(f"\nwall: continuous {t_continuous:.0f}s, killed {t_killed:.0f}s, node 0 failed "
              f"{waited:.1f}s after node 1, total {time.time() - t0:.0f}s")
    finally:
        for node in started:
            node.kill()
