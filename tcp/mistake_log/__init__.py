"""The Mistake Log: entries (record), collection from Pilot outputs, backends, sampling."""

from tcp.mistake_log.base import MistakeLog
from tcp.mistake_log.memory import MemoryMistakeLog
from tcp.mistake_log.record import MistakeBatch

__all__ = ["MemoryMistakeLog", "MistakeBatch", "MistakeLog"]
