"""Exponential backoff between retries: `first`, then twice as long each time, up to `cap`."""

from __future__ import annotations


class Backoff:
    def __init__(self, first: float, cap: float):
        self.first, self.cap = first, cap
        self._next = first

    def next(self) -> float:
        """The delay before the next retry; each call doubles the one after (up to `cap`)."""
        delay = self._next
        self._next = min(delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        """After a success: the next failure waits `first` again, not where the last outage left off."""
        self._next = self.first
