"""tcp's console messages go through the `tcp` logger: rank 0 only, info to stdout and warnings
to stderr, the level from `--log-level` or TCP_LOG_LEVEL; a bad level is one line and exit 2."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tcp.runtime.console import logger, setup_logging

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_logger():
    """The `tcp` logger as a new process has it; restored afterwards for the other tests. (It
    propagates again, so that pytest does not attach its capture handlers to it as it does to
    a non-propagating logger, which setup_logging would take for an application's.)"""
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def test_info_to_stdout_warnings_to_stderr(fresh_logger, capsys, monkeypatch):
    monkeypatch.delenv("TCP_LOG_LEVEL", raising=False)
    setup_logging()
    logger.info("[tcp] an info line")
    logger.debug("[tcp] a debug line")
    logger.warning("[tcp] warning: a warning")
    out, err = capsys.readouterr()
    assert out == "[tcp] an info line\n"
    assert err == "[tcp] warning: a warning\n"


def test_level_from_the_flag_or_the_environment(fresh_logger, capsys, monkeypatch):
    monkeypatch.setenv("TCP_LOG_LEVEL", "warning")
    setup_logging()
    logger.info("[tcp] hidden")
    assert capsys.readouterr().out == ""
    setup_logging("debug")  # the flag wins over the environment, and may come later
    logger.debug("[tcp] shown")
    assert capsys.readouterr().out == "[tcp] shown\n"
    assert len(logger.handlers) == 2  # not added twice
    setup_logging()  # a job's own call keeps the level the command line set
    logger.debug("[tcp] still shown")
    assert capsys.readouterr().out == "[tcp] still shown\n"
    with pytest.raises(ValueError, match="use one of debug, info, warning, error"):
        setup_logging("loud")


def test_an_application_s_own_handler_is_kept(fresh_logger, capsys):
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    setup_logging()
    assert logger.handlers == [handler]
    logger.info("[tcp] to the application")
    assert seen == ["[tcp] to the application"]
    assert capsys.readouterr().out == ""


def test_bad_tcp_log_level_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launcher" / "train.py"), "--dry-run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "TCP_LOG_LEVEL": "loud"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "config error: TCP_LOG_LEVEL: log level 'loud': use one of debug, info, warning, error"]
