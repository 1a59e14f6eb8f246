"""Episode seed namespaces: where each kind of rollout takes its episode seeds, so no two kinds replay the
same episodes (a student is never evaluated on its training episodes, checkpoint validation never on the
episodes it trained on).

Env copy ``i`` of a vector env started at seed ``s`` plays episode seeds ``s + i + k * num_envs`` (its k-th
episode), so each kind of rollout uses a block of consecutive seeds from its start:

========================  =======================================  ==========================================
rollouts                  first episode seed                       setting or function
========================  =======================================  ==========================================
teacher training          ``seed`` (the run's), then the next      ``seed``
                          ``num_envs`` per rollout
evaluation, saliency      10 000                                   ``eval.seed`` (default ``EVAL_SEED``)
robustness evaluation     20 000                                   ``attack.seed`` (default ``ATTACK_SEED``)
cascade monitor           30 000                                   ``cascade.seed`` (default ``CASCADE_SEED``)
alert calibration         40 000                                   ``alerts.calibration_seed``
                                                                   (default ``ALERT_CALIBRATION_SEED``)
DAgger round ``r``        1 000 000 * (1 + seed) + 100 000 * r     ``dagger_round_seed``
robust fine-tuning        10 000 000 * (1 + seed)                  ``finetune_episode_seed``
its checkpoint selection  10 000 000 * (1 + seed) + 5 000 000      ``finetune_validation_seed``
purifier training data    200 000 000 + 1 000 000 * seed           ``purify_seed``
robust training's         300 000 000 + 10 000 000 * seed          ``director_seed``
director, training k      + 100 000 * k
========================  =======================================  ==========================================

Blocks stay apart while each kind plays fewer episodes than the gap to the next block: teacher training
under 10 000 episodes (a longer training run reaches the evaluation seeds, e.g. 1.5M agent-steps of
speaker-listener are 30 000 episodes), evaluation under 10 000, DAgger under 10 rounds of 100 000 and run seeds
under 9 (DAgger of seed 9 starts where fine-tuning of seed 0 does).
"""

from __future__ import annotations

EVAL_SEED = 10_000  # eval.seed's default
ATTACK_SEED = 20_000  # attack.seed's default
CASCADE_SEED = 30_000  # cascade.seed's default
ALERT_CALIBRATION_SEED = 40_000  # alerts.calibration_seed's default
DAGGER_SEED = 1_000_000  # DAgger's block of a run seed, per unit of (1 + seed)
DAGGER_ROUND = 100_000  # seeds between consecutive DAgger rounds
FINETUNE_SEED = 10_000_000  # fine-tuning's block of a run seed, per unit of (1 + seed)
FINETUNE_VALIDATION = 5_000_000  # checkpoint validation's start past fine-tuning's own
PURIFY_SEED = 200_000_000  # the purifier's training data, past every fine-tuning block
DIRECTOR_SEED = 300_000_000  # robust training's alternating director, past every purifier block
DIRECTOR_ROUND = 100_000  # seeds between two trainings of the alternating director


def dagger_round_seed(seed: int, r: int) -> int:
    """The first episode seed of DAgger round ``r`` of a run with seed ``seed``."""
    return DAGGER_SEED * (1 + int(seed)) + DAGGER_ROUND * r


def finetune_episode_seed(seed: int) -> int:
    """The first episode seed of robust fine-tuning of a run with seed ``seed``."""
    return FINETUNE_SEED * (1 + int(seed))


def finetune_validation_seed(seed: int) -> int:
    """The first validation episode seed of fine-tuning's checkpoint selection."""
    return finetune_episode_seed(seed) + FINETUNE_VALIDATION


def purify_seed(seed: int) -> int:
    """The first episode seed of the teacher's clean episodes a purifier of a run with seed ``seed`` learns."""
    return PURIFY_SEED + 1_000_000 * seed


def director_seed(seed: int, k: int) -> int:
    """The first episode seed of the ``k``-th training of the alternating director of a robust training run with
    seed ``seed``."""
    return DIRECTOR_SEED + 10_000_000 * seed + DIRECTOR_ROUND * k
