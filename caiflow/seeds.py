"""Per-row seeds: derived from the run seed and a row's id, never from its position.

A resumed or re-sharded run therefore samples exactly what an uninterrupted run samples.
"""

from __future__ import annotations

import hashlib
import random


def row_seed(run_seed: int, row_id: str, purpose: str) -> int:
    """A 31-bit seed for one row and one use (e.g. 'answer', 'critique-1')."""
    digest = hashlib.sha256(f"{run_seed}:{row_id}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def row_rng(run_seed: int, row_id: str, purpose: str) -> random.Random:
    """A private RNG for one row and one use (principle sampling, pair order)."""
    return random.Random(row_seed(run_seed, row_id, purpose))
