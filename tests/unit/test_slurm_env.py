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
