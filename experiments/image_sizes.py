"""Parameter counts and CPU cost of the default image encoders (teacher.cnn, student.cnn) by image size,
next to the flattened 2x256 MLP teacher that image observations got before they had a CNN.

    python experiments/image_sizes.py        # writes experiments/results/image_sizes.json

Counts are exact; times are one forward and backward pass of a 64-image minibatch on one CPU thread (median
of 5), which vary with the machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from gymnasium import spaces
from omegaconf import OmegaConf

from madistill.cli import compose_config
from madistill.envs import AgentGroup
from madistill.policies import MLPPolicy, SB3Policy

SIZES = [(36, 36, 3), (84, 84, 3), (280, 480, 3)]
N_ACTIONS = 5
OUT = Path(__file__).resolve().parent / "results" / "image_sizes.json"


def flat_teacher_parameters(obs_dim: int, hidden: list[int], n_actions: int) -> int:
    """SB3's actor-critic MLP over a flattened observation (actor and critic of ``hidden``, no CNN)."""
    widths = [obs_dim, *hidden]
    mlp = sum(a * b + b for a, b in zip(widths, widths[1:]))
    return 2 * mlp + hidden[-1] * n_actions + n_actions + hidden[-1] + 1


def step_seconds(policy: torch.nn.Module, obs_dim: int) -> float:
    x = torch.rand(64, obs_dim)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        policy(x).sum().backward()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = compose_config()
    rows = []
    for shape in SIZES:
        g = AgentGroup("camera", ("camera_0",), spaces.Box(0, 255, shape, np.uint8), spaces.Discrete(N_ACTIONS))
        arch = {role: {"hidden_sizes": list(cfg[role].hidden_sizes), "activation": cfg[role].activation,
                       "cnn": OmegaConf.to_container(cfg[role].cnn)} for role in ("teacher", "student")}
        teacher, student = SB3Policy.from_arch(g, arch["teacher"]), MLPPolicy(g, arch["student"])
        rows.append({
            "image": list(shape),
            "flattened_mlp_teacher_parameters": flat_teacher_parameters(g.obs_dim, arch["teacher"]["hidden_sizes"], N_ACTIONS),
            "teacher_parameters": teacher.num_parameters,
            "teacher_acting_parameters": teacher.acting_parameters,
            "student_parameters": student.num_parameters,
            "teacher_step_s": step_seconds(teacher, g.obs_dim),
            "student_step_s": step_seconds(student, g.obs_dim),
        })
        print(rows[-1])
    OUT.write_text(json.dumps({"n_actions": N_ACTIONS, "torch_threads": 1, "minibatch": 64, "rows": rows}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
