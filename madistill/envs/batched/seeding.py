"""mpe2's seeded reset draws for many episode seeds at once, bit for bit numpy's.

mpe2's ``reset(seed=s)`` draws from ``Generator(PCG64(SeedSequence(s)))`` (gymnasium's ``np_random``).
Building that generator costs microseconds per episode, the largest per-copy cost of a batched reset, so
here numpy's SeedSequence hashing, PCG64 seeding and its first outputs are computed for all seeds at once,
following numpy's C code (``bit_generator.pyx``, ``pcg64.h``, ``distributions.c``). Seeds outside
``[0, 2**64)`` and bounded draws numpy would reject (probability about 2**-32 each) are left to numpy's own
generator (``bounded`` marks the rejected ones).
"""

from __future__ import annotations

import numpy as np

_M32 = np.uint64(0xFFFFFFFF)
# SeedSequence's hash constants
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = np.uint32(0xCA01F9DD), np.uint32(0x4973F715)
_POOL = 4
# PCG64's 128-bit LCG multiplier, as (high, low) 64-bit halves
_MULT_HI, _MULT_LO = np.uint64(2549297995355413924), np.uint64(4865540595714422341)


def _hash_constants(init: int, mult: int, n: int) -> list[np.uint32]:
    """The hash constant each of ``n`` successive hashes uses: it does not depend on the data."""
    out, h = [], init
    for _ in range(n):
        out.append(h)
        h = (h * mult) & 0xFFFFFFFF
    return [np.uint32(c) for c in out]


def _hash(value: np.ndarray, const: np.uint32, mult: int) -> np.ndarray:
    """SeedSequence's ``hashmix`` with the constant it reaches at this point (the constant is advanced by
    ``mult`` before it multiplies)."""
    value = value ^ const
    value = value * np.uint32((int(const) * mult) & 0xFFFFFFFF)
    return value ^ (value >> np.uint32(16))


def _mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r = _MIX_L * x - _MIX_R * y
    return r ^ (r >> np.uint32(16))


def _seed_state(seeds: np.ndarray) -> np.ndarray:
    """``SeedSequence(seed).generate_state(4, np.uint64)`` for every seed (``[seeds, 4]`` uint64)."""
    consts = iter(_hash_constants(_INIT_A, _MULT_A, _POOL + _POOL * (_POOL - 1)))
    # the seed as little-endian 32-bit words; the pool's words past them hash a 0, as numpy's do
    words = [(seeds & _M32).astype(np.uint32), (seeds >> np.uint64(32)).astype(np.uint32)]
    words += [np.zeros_like(words[0])] * (_POOL - 2)
    pool = [_hash(w, next(consts), _MULT_A) for w in words]
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = _mix(pool[dst], _hash(pool[src], next(consts), _MULT_A))
    out = [_hash(pool[i % _POOL], c, _MULT_B) for i, c in enumerate(_hash_constants(_INIT_B, _MULT_B, 8))]
    return np.stack([out[2 * i].astype(np.uint64) | (out[2 * i + 1].astype(np.uint64) << np.uint64(32))
                     for i in range(4)], axis=1)


def _mul64(a: np.ndarray, b: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """The full 128-bit product of 64-bit ``a`` and ``b`` as (high, low) halves."""
    a0, a1 = a & _M32, a >> np.uint64(32)
    b0, b1 = b & _M32, b >> np.uint64(32)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> np.uint64(32)) + (p01 & _M32) + (p10 & _M32)
    low = (p00 & _M32) | (mid << np.uint64(32))
    high = p11 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))
    return high, low


def _step(hi: np.ndarray, lo: np.ndarray, inc_hi: np.ndarray, inc_lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One PCG64 LCG step, ``state * multiplier + inc`` mod 2**128."""
    high, low = _mul64(lo, _MULT_LO)
    high = high + hi * _MULT_LO + lo * _MULT_HI
    new_lo = low + inc_lo
    return high + inc_hi + (new_lo < low).astype(np.uint64), new_lo


def pcg64_outputs(seeds: np.ndarray, n: int) -> np.ndarray:
    """``[seeds, n]`` uint64: the first ``n`` 64-bit outputs of ``PCG64(SeedSequence(seed))`` for seeds in
    ``[0, 2**64)``."""
    with np.errstate(over="ignore"):  # the arithmetic is meant to wrap
        s = _seed_state(np.asarray(seeds, dtype=np.uint64))
        # pcg64_set_seed: state 0, inc = (initseq << 1) | 1, step, state += initstate, step
        inc_hi = (s[:, 2] << np.uint64(1)) | (s[:, 3] >> np.uint64(63))
        inc_lo = (s[:, 3] << np.uint64(1)) | np.uint64(1)
        zero = np.zeros_like(inc_lo)
        hi, lo = _step(zero, zero, inc_hi, inc_lo)
        lo2 = lo + s[:, 1]
        hi, lo = _step(hi + s[:, 0] + (lo2 < lo).astype(np.uint64), lo2, inc_hi, inc_lo)
        out = np.empty((len(s), n), dtype=np.uint64)
        for k in range(n):  # each output steps first, then permutes the new state (XSL RR)
            hi, lo = _step(hi, lo, inc_hi, inc_lo)
            x, r = hi ^ lo, hi >> np.uint64(58)
            out[:, k] = (x >> r) | (x << ((np.uint64(64) - r) & np.uint64(63)))
    return out


def uniform(outputs: np.ndarray, low: float, high: float) -> np.ndarray:
    """``Generator.uniform(low, high)`` from 64-bit outputs: ``low + (high - low) * next_double``."""
    return low + (high - low) * ((outputs >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0))


def bounded(words: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``Generator.integers(n)`` (n < 2**32) from 32-bit draws, by Lemire's method as numpy does it:
    (values, rejected). Where ``rejected``, numpy would draw again."""
    m = words.astype(np.uint64) * np.uint64(n)
    threshold = (2**32 - n) % n
    return (m >> np.uint64(32)).astype(np.int64), (m & _M32) < np.uint64(threshold)
