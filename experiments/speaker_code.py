"""Which message the speaker sends for each goal colour (simple_speaker_listener_v4): its code book.

A speaker that sends one message for two goals leaves the listener to park between those landmarks; this
counts, over greedy episodes with the evaluation seeds, how often each message follows each goal.

    python experiments/speaker_code.py runs/long_sl/s1 [--episodes 200]
"""

from __future__ import annotations

import argparse

import numpy as np

from madistill.envs.factory import EnvSpec
from madistill.envs.vector import MultiAgentVecEnv
from madistill.policies.store import load_team, read_manifest
from madistill.rollout import Rollout, Transition
from madistill.stages.policies import teacher_dir


def code_book(policy: str, episodes: int, seed: int) -> tuple[np.ndarray, float]:
    """``[goal, message]`` shares of the speaker's greedy messages, and the mean greedy team return."""
    pdir = teacher_dir(policy)
    spec = EnvSpec.from_dict(read_manifest(pdir)["env"])
    with MultiAgentVecEnv(spec, 20, num_workers=0) as venv:
        team, _ = load_team(pdir, venv.groups)
        speaker = team["speaker"].group
        counts = np.zeros((speaker.obs_dim, int(speaker.action_space.n)))

        def count(tr: Transition) -> None:
            goals = tr.raw_obs["speaker"][:, 0].argmax(-1)  # the speaker observes the goal's colour, one-hot
            np.add.at(counts, (goals, tr.actions["speaker"][:, 0].cpu().numpy()), 1)

        records = Rollout(venv, team, deterministic=True, seed=seed).run(episodes=episodes, on_step=count)
    return counts / counts.sum(1, keepdims=True), float(np.mean([r.team_return for r in records]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("policy", help="a speaker-listener run or policy directory")
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--seed", type=int, default=10_000)
    args = ap.parse_args()
    shares, team_return = code_book(args.policy, args.episodes, args.seed)
    print(f"{args.policy}: greedy team return {team_return:.2f} over {args.episodes} episodes (seeds {args.seed}+)")
    print("goal  " + "  ".join(f"msg {m}" for m in range(shares.shape[1])))
    for goal, row in enumerate(shares):
        print(f"{goal:>4}  " + "  ".join(f"{v:5.2f}" for v in row))
    used = {int(row.argmax()) for row in shares}
    print(f"distinct messages for {shares.shape[0]} goals: {len(used)}")


if __name__ == "__main__":
    main()
