"""tcp.runtime.quiet: the known third-party messages of the main job are silenced, each by its text,
and nothing else is (other warnings and log records of the same libraries still print)."""

import io
import logging
import warnings
from contextlib import redirect_stdout

import pytest

from tcp.runtime import quiet

# Verbatim from the main job's console before tcp.runtime.quiet existed.
TORCH_DEPRECATIONS = (
    "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
    "`torch.distributed.all_gather_single` instead.",
    "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
    "`torch.distributed.reduce_scatter_single` instead.",
)
LOG_RECORDS = (
    ("DeepSpeed", "A module has unknown inputs or outputs type (<class "
     "'tcp.models.copilot.CopilotCache'>) and the tensors embedded in it cannot be detected. "
     "The ZeRO-3 hooks designed to trigger before or after backward pass of the module relies "
     "on knowing the input and output tensors and therefore may not get triggered properly."),
    ("mlflow.store.db.utils", "Creating initial MLflow database tables..."),
    ("mlflow.store.db.utils", "Updating database tables"),
)
LR_WARNING = "Attempting to get learning rate from scheduler before it has started"


@pytest.fixture(autouse=True)
def _restore():
    """install() changes process-wide state; the rest of the test session does not keep it."""
    with warnings.catch_warnings():
        yield
    for name in quiet.LOG_RECORDS:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, quiet.DropMessages)]:
            logger.removeFilter(f)


def _warn(message: str, module: str, category: type[Warning] = FutureWarning) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py",
                               lineno=83, module=module)
    return caught


@pytest.mark.parametrize("message", TORCH_DEPRECATIONS)
def test_deepspeed_collective_deprecations_are_silenced(message):
    assert _warn(message, "torch.distributed.c10d_logger") == []


def test_other_warnings_still_print():
    # another torch.distributed deprecation, the same one raised by other code, a UserWarning
    assert len(_warn("`torch.distributed.all_reduce_coalesced` will be deprecated.",
                     "torch.distributed.c10d_logger")) == 1
    assert len(_warn(TORCH_DEPRECATIONS[0], "tcp.training.engines")) == 1
    assert len(_warn("something else", "torch.nn.modules.module", UserWarning)) == 1


def _kept(name: str, msg: str, level: int = logging.WARNING) -> bool:
    logger = logging.getLogger(name)
    record = logger.makeRecord(name, level, __file__, 1, msg, (), None)
    return bool(logger.filter(record))


@pytest.mark.parametrize("name,message", LOG_RECORDS)
def test_known_log_records_are_dropped(name, message):
    quiet.install()
    assert not _kept(name, message)


def test_other_log_records_pass():
    quiet.install()
    assert _kept("DeepSpeed", "A module has unknown inputs or outputs type (<class 'Foo'>) and")
    assert _kept("DeepSpeed", "total_num_steps 3 is less than warmup_num_steps 20")
    assert _kept("mlflow.store.db.utils", "Creating initial MLflow database tables... failed")


def test_install_is_idempotent():
    quiet.install()
    quiet.install()
    for name in quiet.LOG_RECORDS:
        assert sum(isinstance(f, quiet.DropMessages) for f in logging.getLogger(name).filters) == 1


def test_scheduler_warning_dropped_only_while_an_engine_is_built():
    assert _kept("DeepSpeed", LR_WARNING)
    with quiet.engine_build():
        assert not _kept("DeepSpeed", LR_WARNING)
        assert _kept("DeepSpeed", "some other DeepSpeed warning")
    assert _kept("DeepSpeed", LR_WARNING)


def test_deepspeed_init_drops_the_op_line_and_passes_the_rest():
    out = io.StringIO()
    with redirect_stdout(out):
        with quiet.deepspeed_init():
            print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
            print("something DeepSpeed had to say")
    assert out.getvalue() == "something DeepSpeed had to say\n"
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(RuntimeError):
        with quiet.deepspeed_init():
            print("compiler output")
            raise RuntimeError("build failed")
    assert out.getvalue() == "compiler output\n"  # passed through on failure too


def test_hf_progress_off_restores():
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    with quiet.hf_progress_off():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled() == was
