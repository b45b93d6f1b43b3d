"""The Mistake Log: entries (record), backends, the on-disk store, its writers and the replay
sampler. (Entries are made from a Pilot step in tcp.models.log_entries.)"""

from tcp.mistake_log.base import MistakeLog
from tcp.mistake_log.memory import MemoryMistakeLog
from tcp.mistake_log.record import MistakeBatch

__all__ = ["MemoryMistakeLog", "MistakeBatch", "MistakeLog"]
