"""The main job's console: third-party messages tcp silences because they are expected and
harmless in a tcp run, each matched by its exact text (and, where it is stable, the module that
raises it). Never a whole library's warnings or logging: any other warning still prints.

What is silenced, and why it is harmless:

- torch FutureWarning "`torch.distributed.all_gather_into_tensor` / `reduce_scatter_tensor` is
  deprecated": raised inside DeepSpeed's ZeRO-3 collectives (DeepSpeed calls them, not tcp);
  nothing for a user to change, and the calls work.
- DeepSpeed "Attempting to get learning rate from scheduler before it has started": DeepSpeed's
  warm-up schedulers call their own `get_lr()` in their constructor to set the initial (warm-up
  start) rate. Silenced only while `deepspeed.initialize` builds an engine (`engine_build`), so
  a real early `get_lr()` later still warns.
- DeepSpeed "A module has unknown inputs or outputs type (<class '...CopilotCache'>)": the
  Copilot's decoding cache is passed to the Copilot during generation, which runs under
  `torch.no_grad()`, so the ZeRO-3 backward hooks it mentions never run. Only this class: an
  unknown type anywhere else still warns.
- DeepSpeed's print "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
  (once per rank while `deepspeed.init_distributed` loads its CPU all-reduce op): dropped from
  what `deepspeed_init` captured; everything else it printed is passed through.
- MLflow "Creating initial MLflow database tables..." / "Updating database tables": a new
  tracking database being created, on a first run.
- transformers' "Loading weights" / "Writing model shards" progress bars, for tcp's own loads and
  saves of local folders (`hf_progress_off`): one line per rank each, finished in milliseconds.

The lines left are the `deepspeed` runner's own (it runs before any tcp code); README "Quick
start" explains them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import warnings
from collections.abc import Iterator

# (category, message regex, module regex or "" for any) for warnings.filterwarnings.
WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning,
     r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
     r"torch\.distributed\.c10d_logger"),
)

# logger name -> regexes of the records dropped (a filter on that logger: its own records only).
LOG_RECORDS: dict[str, tuple[str, ...]] = {
    "DeepSpeed": (
        r"^A module has unknown inputs or outputs type \(<class 'tcp\.models\.copilot\."
        r"CopilotCache'>\)",),
    "mlflow.store.db.utils": (
        r"^Creating initial MLflow database tables\.\.\.$",
        r"^Updating database tables$"),
}

# Dropped only while `deepspeed.initialize` runs (engine_build).
ENGINE_BUILD_RECORDS: tuple[str, ...] = (
    r"^Attempting to get learning rate from scheduler before it has started$",)

# Lines dropped from what `deepspeed.init_distributed` prints (deepspeed_init).
INIT_STDOUT: tuple[str, ...] = (r"^DeepSpeed [\w.]+ built successfully$",)


class DropMessages(logging.Filter):
    """A logging filter dropping records whose message matches one of `patterns`."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = tuple(re.compile(p) for p in patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(p.search(msg) for p in self.patterns)


def install() -> None:
    """Install the warning and logging filters for this process (idempotent). Called by the
    main job's entry point before anything is built."""
    for category, message, module in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, patterns in LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(patterns))


@contextlib.contextmanager
def engine_build() -> Iterator[None]:
    """While DeepSpeed builds an engine: drop its schedulers' construction-time warning."""
    logger = logging.getLogger("DeepSpeed")
    drop = DropMessages(ENGINE_BUILD_RECORDS)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def deepspeed_init() -> Iterator[None]:
    """Capture what Python code prints to stdout meanwhile and pass it through without the
    lines in INIT_STDOUT (also when the body raises)."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        kept = [line for line in buf.getvalue().splitlines(keepends=True)
                if not any(re.search(p, line.rstrip("\n")) for p in INIT_STDOUT)]
        if kept:
            sys.stdout.write("".join(kept))
            sys.stdout.flush()


@contextlib.contextmanager
def hf_progress_off() -> Iterator[None]:
    """transformers' (and huggingface_hub's) progress bars off meanwhile, then as they were.
    For tcp's own loads and saves of local folders; never around a download."""
    # heavy: transformers loads only where a model is loaded or saved
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    was, hub_was = hf_logging.is_progress_bar_enabled(), \
        not hub_utils.are_progress_bars_disabled()
    if was:
        hf_logging.disable_progress_bar()  # huggingface_hub's too
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
            if not hub_was:
                hub_utils.disable_progress_bars()
