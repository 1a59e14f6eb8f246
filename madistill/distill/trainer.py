"""DistillTrainer: DAgger rounds of collection and teacher labelling, then student updates on the
aggregated data, one compact student per teacher group."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from madistill.attacks.budget import group_budgets
from madistill.attacks.collection import collection_transforms, training_director
from madistill.attacks.learned import AlternatingDirector
from madistill.attacks.lookahead import LookaheadAttack
from madistill.branching import Branching, value_critic
from madistill.common.collect import collect_labelled
from madistill.common.divergences import divergence
from madistill.common.episodes import team_returns
from madistill.common.schedules import linear_ramp
from madistill.distill.dataset import GroupData, label, mixed_team, rounds_beta
from madistill.distill.loss import DistillLoss, teacher_actions
from madistill.envs.features import FeatureLayout
from madistill.envs.vector import MultiAgentVecEnv
from madistill.explain.metrics import agreement
from madistill.explain.saliency import SaliencyLabeller, gradient_saliency
from madistill.policies.base import TeamPolicy, warn_if_large
from madistill.policies.mlp import MLPPolicy
from madistill.seeds import dagger_round_seed
from madistill.tb import TBLogger
from madistill.transforms import ActionTransform, ObsTransform


def student_team(teacher: TeamPolicy, arch: dict[str, Any]) -> TeamPolicy:
    """Fresh students for every teacher group; they share the teacher's normalisers (same input units)."""
    students = {g.name: MLPPolicy(g, arch) for g in teacher.groups}
    return TeamPolicy(teacher.groups, students, teacher.normalizers).to(teacher.device)


class DistillTrainer:
    """Distils ``teacher`` into ``student`` (both TeamPolicies over the same groups) in ``venv``."""

    def __init__(
        self,
        cfg: Any,
        venv: MultiAgentVecEnv,
        teacher: TeamPolicy,
        student: TeamPolicy,
        layouts: Mapping[str, FeatureLayout],
        tb: TBLogger | None = None,
        branching: Branching | None = None,
        sides: Mapping[str, Sequence[str]] | None = None,
    ):
        """``sides``: the env's teams, by whose returns the lookahead collection targets each team's agents."""
        self.cfg, self.venv, self.teacher, self.student, self.layouts, self.tb = cfg, venv, teacher, student, layouts, tb
        dc = cfg.distill
        self.dc, self.branching, self.sides = dc, branching, sides
        self.loss = DistillLoss.from_config(dc, cfg.attack.target_candidates)
        self.optimizers = {
            g.name: torch.optim.Adam(student[g.name].parameters(), lr=dc.learning_rate) for g in teacher.groups
        }
        self.labeller = SaliencyLabeller.from_config(cfg.saliency, layouts, cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        # The training attacks draw on the data's device, which a CPU generator cannot do on CUDA; on CPU they
        # keep drawing from the one stream, so CPU runs stay what they were.
        device = teacher.device
        self.attack_generator = (self.generator if device.type == "cpu"
                                 else torch.Generator(device=device).manual_seed(cfg.seed))
        for p in teacher.parameters():
            p.requires_grad_(False)
        for g in teacher.groups:
            warn_if_large(student[g.name], "student", int(cfg.warn_parameters))
        # unit-radius budgets (attack.exclude and attack.scale respected), scaled by the ramped eps at every update
        self.unit_budgets = group_budgets(1.0, layouts, cfg.attack.exclude, teacher.device, cfg.attack.scale)
        self.total_updates = dc.rounds * dc.updates_per_round
        # the average only becomes the student at the end: DAgger rounds and held-out metrics use the live weights
        self.averages = {g.name: torch.optim.swa_utils.AveragedModel(
            student[g.name], multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(dc.weight_average))
            for g in teacher.groups} if dc.weight_average > 0 else {}
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor) for opt in self.optimizers.values()]
        self.updates_done = 0
        self.director: AlternatingDirector | None = None  # adv_collect_objective=director, from its first round
        self.data: dict[str, GroupData] = {}
        self.history: list[dict[str, float]] = []

    def train(self) -> TeamPolicy:
        """All DAgger rounds; returns the trained student team (also logged round by round)."""
        dc = self.dc
        betas = rounds_beta(dc.rounds, dc.beta_start, dc.beta_decay)
        show = self.cfg.logger.progress
        bar = tqdm(total=self.total_updates, desc="distil", unit="upd", disable=not show)
        with bar:
            for r, beta in enumerate(betas):
                acting = mixed_team(self.teacher, self.student, beta, dagger_round_seed(self.cfg.seed, r))
                transforms = self._collection_attack(beta)
                lookahead = next((t for t in transforms if isinstance(t, LookaheadAttack)), None)
                recorded = (lambda la=lookahead: la.targets) if lookahead is not None and dc.adv_collect_targets else None
                obs, targets, episodes = collect_labelled(
                    self.venv, acting, dagger_round_seed(self.cfg.seed, r), dc.deterministic, recorded,
                    agent_steps=dc.agent_steps_per_round, transforms=transforms,
                )
                new = label(self.teacher, obs, self.labeller, r, dc.heldout_fraction, self.generator, targets)
                self.data = {g: self.data[g].cat(d) if g in self.data else d for g, d in new.items()}
                losses = self._update(dc.updates_per_round, bar)
                row = {"round": r, "beta": beta, "round_team_return": team_returns(episodes), **losses}
                row.update(self.evaluate_heldout())
                self._log(row, r)
                bar.set_postfix(ret=f"{row['round_team_return']:.2f}", beta=f"{beta:.2f}")
        for name, average in self.averages.items():
            self.student[name].load_state_dict(average.module.state_dict())
        return self.student

    def _update(self, n: int, bar: tqdm) -> dict[str, float]:
        """``n`` minibatch steps for every group on its aggregated training data; mean loss terms."""
        sums: dict[str, float] = {}
        train = {name: d.select(~d.heldout) for name, d in self.data.items()}
        for _ in range(n):
            eps = self.adv_eps() if self.loss.adversarial else None
            for name, d in train.items():
                if len(d) == 0:
                    continue
                idx = torch.randint(len(d), (min(self.dc.batch_size, len(d)),), generator=self.generator)
                budget = None if eps is None else self.unit_budgets[name].scaled(eps)
                terms = self.loss(self.student[name], d.select(idx.to(d.obs.device)), self.layouts[name],
                                  self.teacher[name].log_std(), budget, self.attack_generator)
                opt = self.optimizers[name]
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                torch.nn.utils.clip_grad_norm_(self.student[name].parameters(), self.dc.max_grad_norm)
                opt.step()
                if self.averages:
                    self.averages[name].update_parameters(self.student[name])
                for k, v in terms.items():
                    sums[f"{name}/loss_{k}"] = sums.get(f"{name}/loss_{k}", 0.0) + float(v.detach()) / n
            self.updates_done += 1
            for scheduler in self.schedulers:
                scheduler.step()
            bar.update(1)
        sums["learning_rate"] = self.dc.learning_rate * self.lr_factor(self.updates_done)
        if self.loss.adversarial:
            sums["adv_eps"] = self.adv_eps()
        return sums

    def _collection_attack(self, beta: float) -> list[ObsTransform | ActionTransform]:
        """With ``adv_collect`` > 0, the rounds in which the student acts are collected partly under attack
        (``adv_collect_objective``, by default the loss's collection attack, crafted on the student, every agent a
        victim, the current ramped eps): the student then also learns the teacher's actions in the states an
        attacked team drifts into, which clean rollouts never visit. ``targeted_lookahead`` needs the env's
        ``branching`` (given to the trainer) and uses the teacher's local critic where it has one."""
        if self.dc.adv_collect <= 0 or not self.loss.adversarial or beta >= 1 or self.adv_eps() <= 0:
            return []
        objective = str(self.dc.adv_collect_objective or self.loss.collection_objective())
        if objective == "director":  # ATLA-style alternation: trained against the student before each round it acts in
            if self.director is None:
                self.director = training_director(self.venv.spec, self.teacher.groups, self.loss.adv_steps,
                                                  self.cfg.attack, self.cfg.seed)
            tqdm.write(f"training the director against the student: {self.cfg.attack.director_retrain_steps} env "
                       "steps (attack.director_retrain_steps)")
            self.director.train_against(self.student, self.unit_budgets, self.adv_eps())
        return collection_transforms(self.teacher.groups, self.unit_budgets, objective, self.loss.adv_steps,
                                     float(self.dc.adv_collect), self.adv_eps(), self.cfg.attack, self.branching,
                                     value_critic(self.teacher), surrogate=self.student, director=self.director,
                                     sides=self.sides)

    def lr_factor(self, update: int) -> float:
        """Share of ``learning_rate`` at ``update``: cosine from 1 down to ``lr_final`` over all updates."""
        progress = min(1.0, update / max(1, self.total_updates))
        return self.dc.lr_final + (1.0 - self.dc.lr_final) * 0.5 * (1.0 + float(np.cos(np.pi * progress)))

    def adv_eps(self) -> float:
        """The adversarial budget now: linear from 0 to ``adv_eps`` over the first ``adv_ramp`` of the updates."""
        return linear_ramp(float(self.dc.adv_eps), self.updates_done, self.dc.adv_ramp * self.total_updates)

    def evaluate_heldout(self) -> dict[str, float]:
        """Teacher-student action agreement, KL(teacher || student) and saliency agreement on held-out data."""
        out: dict[str, float] = {}
        for name, d in self.data.items():
            held = d.select(d.heldout)
            if len(held) == 0:
                continue
            policy = self.student[name]
            with torch.no_grad():
                head = policy(held.obs)
                kl = divergence("kl", held.teacher_head, head, discrete=policy.group.discrete,
                                teacher_log_std=self.teacher[name].log_std(), student_log_std=policy.log_std())
            out[f"{name}/kl"] = float(kl.mean())
            if policy.group.discrete:
                out[f"{name}/agreement"] = float((head.argmax(-1) == held.teacher_head.argmax(-1)).float().mean())
            else:
                out[f"{name}/mean_mse"] = float((head - held.teacher_head).pow(2).mean())
            sal = gradient_saliency(
                policy, held.obs, teacher_actions(policy, held.teacher_head), self.cfg.saliency.target, self.layouts[name]
            )
            for k, v in agreement(sal, held.saliency, self.cfg.saliency.topk).items():
                out[f"{name}/saliency_{k}"] = v
        return out

    def _log(self, row: dict[str, float], r: int) -> None:
        self.history.append(row)
        if self.tb is None:
            return
        for k, v in row.items():
            if k != "round" and np.isfinite(v):
                self.tb.scalar(f"distill/{k}", v, r)
        self.tb.flush()
