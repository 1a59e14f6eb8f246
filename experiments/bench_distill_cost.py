"""Cost of explanations and of DIGR, measured side by side on a saved teacher and a same-sized student.

1. One student gradient-saliency map (one backward pass) vs one teacher perturbation-saliency map
   (G + 1 perturbed copies in one forward pass), per observation: single observations (latency) and
   batches of 1024 (throughput). Goal: the gradient map is at least 10x cheaper.
2. One DIGR training step (lambda > 0: double backward) vs one plain distillation step (lambda = 0), same
   batch and student. Goal: at most 3x.

    python experiments/bench_distill_cost.py runs/teachers/simple_speaker_listener_v4 [--repeats 7]

Repeats are interleaved and the medians reported, so both sides see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from madistill.distill.dataset import GroupData
from madistill.distill.loss import DistillLoss
from madistill.distill.trainer import student_team
from madistill.envs.factory import EnvSpec
from madistill.envs.vector import MultiAgentVecEnv
from madistill.explain.saliency import FeatureLayout, SaliencyLabeller, gradient_saliency
from madistill.policies.store import load_team, read_manifest
from madistill.stages.policies import teacher_dir

RESULTS = Path(__file__).parent / "results"


def timed(fn: Callable[[], object], n: int) -> float:
    """Seconds per call of ``fn``, averaged over ``n`` calls after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("teacher", help="teacher run or policy directory")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--student", type=int, nargs="+", default=[64, 64], help="student hidden sizes")
    ap.add_argument("--batch", type=int, default=512, help="training batch for the step timing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    tdir = teacher_dir(args.teacher)
    spec = EnvSpec.from_dict(read_manifest(tdir)["env"])
    with MultiAgentVecEnv(spec, 1, num_workers=0) as venv:
        teacher, _ = load_team(tdir, venv.groups)
    group = max(teacher.groups, key=lambda g: g.obs_dim)  # the richer observation
    layout = FeatureLayout.build(group.obs_dim)  # one group per feature: the most copies
    labeller = SaliencyLabeller({group.name: layout})
    student = student_team(teacher, {"hidden_sizes": args.student, "activation": "tanh"})[group.name]
    t_pol = teacher[group.name]
    x1, xb = torch.randn(1, group.obs_dim), torch.randn(1024, group.obs_dim)
    batch = GroupData(
        torch.randn(args.batch, group.obs_dim), t_pol(torch.randn(args.batch, group.obs_dim)).detach(),
        torch.rand(args.batch, len(layout)), torch.zeros(args.batch), torch.zeros(args.batch, dtype=torch.bool),
    )
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)

    def step(lam: float) -> Callable[[], None]:
        loss = DistillLoss(lambda_igr=lam)

        def run() -> None:
            opt.zero_grad()
            loss(student, batch, layout)["total"].backward()
            opt.step()

        return run

    cases = {
        "perturbation_1": lambda: labeller(t_pol, group.name, x1),
        "gradient_1": lambda: gradient_saliency(student, x1, layout=layout),
        "perturbation_1024": lambda: labeller(t_pol, group.name, xb),
        "gradient_1024": lambda: gradient_saliency(student, xb, layout=layout),
        "plain_step": step(0.0),
        "digr_step": step(1.0),
    }
    calls = {k: (200 if k.endswith("_1") else 30) for k in cases}
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for k, fn in cases.items():
            samples[k].append(timed(fn, calls[k]))
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "teacher": str(tdir),
        "group": group.name,
        "features": group.obs_dim,
        "teacher_acting_parameters": t_pol.acting_parameters,
        "student_parameters": student.num_parameters,
        "median_seconds": med,
        "saliency_speedup_single": med["perturbation_1"] / med["gradient_1"],
        "saliency_speedup_batch": med["perturbation_1024"] / med["gradient_1024"],
        "digr_step_ratio": med["digr_step"] / med["plain_step"],
        "repeats": args.repeats,
        "batch": args.batch,
    }
    print(f"{spec.id}, group {group.name} ({group.obs_dim} features, perturbation map = {group.obs_dim + 1} copies)")
    print(f"  teacher acting parameters {t_pol.acting_parameters}, student {student.num_parameters}")
    print(f"  one map, single observation: perturbation {1e6 * med['perturbation_1']:.0f} us, "
          f"gradient {1e6 * med['gradient_1']:.0f} us -> {result['saliency_speedup_single']:.1f}x")
    print(f"  one map, batch of 1024: perturbation {1e6 * med['perturbation_1024'] / 1024:.2f} us/obs, "
          f"gradient {1e6 * med['gradient_1024'] / 1024:.2f} us/obs -> {result['saliency_speedup_batch']:.1f}x")
    print(f"  training step, batch {args.batch}: plain {1e3 * med['plain_step']:.2f} ms, "
          f"DIGR {1e3 * med['digr_step']:.2f} ms -> {result['digr_step_ratio']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"distill_cost_{spec.id}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"  written: {out}")


if __name__ == "__main__":
    main()
