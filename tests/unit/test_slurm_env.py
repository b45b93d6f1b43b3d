"""`srun` one task per rank: SLURM's variables become torch's rendezvous variables."""

import pytest

from tcp.errors import RunError
from tcp.runtime.process_group import slurm_env


def test_srun_tasks_map_to_torch_ranks():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "MASTER_ADDR": "node-0"}
    assert slurm_env(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                              "MASTER_PORT": "29500"}


def test_a_launcher_or_a_single_task_keeps_its_own_variables():
    assert slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "3"}) == {}
    assert slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == {}  # srun deepspeed ...
    assert slurm_env({}) == {}


def test_several_tasks_without_master_addr_say_what_to_export():
    with pytest.raises(RunError, match=r"MASTER_ADDR is not set.*scontrol show hostnames"):
        slurm_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_threads_per_rank_shares_the_cores_among_the_node_s_ranks():
    from tcp.runtime.process_group import threads_per_rank

    assert threads_per_rank({"LOCAL_SIZE": "2"}, 2) == 1  # deepspeed --num_gpus 2 on 2 cores
    assert threads_per_rank({"LOCAL_SIZE": "2"}, 16) == 8
    assert threads_per_rank({"LOCAL_WORLD_SIZE": "4"}, 16) == 4  # torchrun
    assert threads_per_rank({}, 16) == 16  # one process
    assert threads_per_rank({"LOCAL_SIZE": "4"}, 2) == 1  # never 0
    assert threads_per_rank({"SLURM_CPUS_PER_TASK": "6"}, 64) == 6  # srun, a task per rank
    assert threads_per_rank({"SLURM_CPUS_PER_TASK": "16", "LOCAL_SIZE": "2"}, 64) == 8  # +deepspeed
    assert threads_per_rank({"TCP_THREADS_PER_RANK": "3", "SLURM_CPUS_PER_TASK": "6"}, 64) == 3
    with pytest.raises(RunError, match="TCP_THREADS_PER_RANK='two'"):
        threads_per_rank({"TCP_THREADS_PER_RANK": "two"}, 4)
    with pytest.raises(RunError, match="must be >= 1"):
        threads_per_rank({"TCP_THREADS_PER_RANK": "0"}, 4)


def test_available_cores_honours_a_cgroup_cpu_limit(tmp_path):
    import os

    from tcp.runtime.process_group import available_cores

    mask = len(os.sched_getaffinity(0))
    limit = tmp_path / "cpu.max"
    limit.write_text("max 100000\n")
    assert available_cores(limit) == mask
    limit.write_text("150000 100000\n")  # 1.5 CPUs: 2 threads
    assert available_cores(limit) == min(mask, 2)
    limit.write_text("50000 100000\n")
    assert available_cores(limit) == 1
    assert available_cores(tmp_path / "missing") == mask
