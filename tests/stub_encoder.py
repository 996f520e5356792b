"""A text encoder for the hook-machinery tests (locks, kills, resumes), where what is tested is the machinery and
not the model: deterministic vectors from each text's hash, a controllable delay per batch, and a log of every
call (process, texts, time) that several processes can append to. Registered as the ``stub`` backend by
:func:`install` (in each process that uses it); tests of the real encoders use MiniLM and tiny Llamas.

Environment: ``STUB_ENCODER_DELAY`` seconds per batch, ``STUB_ENCODER_LOG`` the log file.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from typing import List

import numpy as np

from recbole_llmfuse.dataset_prep import embed

DIM = 8


def vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


class StubEncoder(embed.TextEncoder):
    def __init__(self, batch_size: int = 64, **_):
        super().__init__()
        self.batch_size = int(batch_size)

    def encode(self, texts: List[str]) -> np.ndarray:
        log = os.environ.get("STUB_ENCODER_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {len(texts)} {time.time():.6f}\n")
        time.sleep(float(os.environ.get("STUB_ENCODER_DELAY", "0")) * math.ceil(len(texts) / self.batch_size))
        return np.stack([vector(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)


def install() -> None:
    embed.BACKENDS.setdefault("stub", (StubEncoder, {}))


def calls(log: str) -> List[tuple]:
    """``[(pid, n_texts, time)]`` of every encode call logged so far."""
    if not os.path.exists(log):
        return []
    with open(log) as f:
        return [(int(p), int(n), float(t)) for p, n, t in (line.split() for line in f if line.strip())]
