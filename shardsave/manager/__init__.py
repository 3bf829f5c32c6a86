"""The training-loop surface: :class:`CheckpointManager` (TF2's and Orbax's manager over
a Saver) and the preemption notices it agrees on across ranks."""

from .manager import CheckpointManager

__all__ = ["CheckpointManager"]
