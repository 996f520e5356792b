"""Wall-time accounting of RecBole training runs (used by the benchmarks)."""
from __future__ import annotations

import time
from typing import List

from recbole.trainer import Trainer


class EpochTimer:
    """Context manager recording the wall time of every ``Trainer._train_epoch`` and ``Trainer.evaluate``.

    Works for any trainer subclass that calls RecBole's methods; restores them on exit.

        with EpochTimer() as timer:
            run_recbole(...)
        timer.train, timer.eval   # lists of seconds
    """

    def __init__(self):
        self.train: List[float] = []
        self.eval: List[float] = []
        self._saved = None

    def __enter__(self) -> "EpochTimer":
        train_epoch, evaluate = Trainer._train_epoch, Trainer.evaluate
        self._saved = (train_epoch, evaluate)
        Trainer._train_epoch = self._timed(train_epoch, self.train)
        Trainer.evaluate = self._timed(evaluate, self.eval)
        return self

    def __exit__(self, *exc) -> None:
        Trainer._train_epoch, Trainer.evaluate = self._saved

    @staticmethod
    def _timed(fn, sink: List[float]):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sink.append(time.perf_counter() - start)

        wrapper.__wrapped__ = fn
        return wrapper
