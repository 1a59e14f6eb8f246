"""Typed config schemas (Hydra ConfigStore). YAML files in ``conf/`` fill them; a wrong key or type fails
at startup with Hydra's validation message instead of deep inside a run."""

from __future__ import annotations

import ast
import difflib
import functools
import io
import math
import sys
import tokenize
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from madistill.errors import MadistillError
from madistill.seeds import ALERT_CALIBRATION_SEED, ATTACK_SEED, CASCADE_SEED, EVAL_SEED


class Choice(str, Enum):
    """The values a choice setting takes. Hydra refuses any other when it composes the config, listing these
    (OmegaConf reads an enum setting by member name, so every name is its value). Members are strings that
    print and compare as their value, so code and saved manifests keep the plain names."""

    def __str__(self) -> str:
        return str(self.value)

    __format__ = str.__format__


def _choices(name: str, values: str, doc: str = "") -> Any:
    """A Choice enum called ``name`` whose members are the space-separated ``values``."""
    enum = Choice(name, [(v, v) for v in values.split()], module=__name__, qualname=name)
    enum.__doc__ = doc or f"The values of the {name} settings."
    return enum


Grouping = _choices("Grouping", "auto per_agent")
NanPolicy = _choices("NanPolicy", "error zero")
Backend = _choices("Backend", "auto batched pettingzoo")
Activation = _choices("Activation", "tanh relu elu gelu")
Critic = _choices("Critic", "local central")
UpdateMode = _choices("UpdateMode", "inline thread")
Divergence = _choices("Divergence", "kl reverse_kl prob_l2 logit_mse nll")
Mask = _choices("Mask", "soft topk threshold")
GradientTarget = _choices("GradientTarget", "log_prob logit",
                          "The policy output whose input gradient DIGR regularises and gradient saliency explains.")
AdvObjective = _choices("AdvObjective", "kl ce both targeted_lowest targeted_random all",
                        "The inner adversary of robust distillation (madistill/distill/loss.py).")
PGDObjective = _choices("PGDObjective", "ce kl targeted_lowest targeted_random targeted_lookahead director",
                        "The attack robust training plays its attacked steps under (madistill/attacks/collection.py).")
SaliencyBaseline = _choices("SaliencyBaseline", "mean marginal")
AttackMethod = _choices("AttackMethod", "random fgsm pgd critic spsa transfer offsets learned targeted_random "
                        "targeted_lowest targeted_lookahead director", "The attack suite by name (madistill/attacks/robustness.py says what "
                        "each attacker knows).")
ValidationAttack = _choices("ValidationAttack", "random fgsm pgd spsa", "Per-step attacks that need nothing but "
                            "the candidate itself (no surrogate, critic or training).")
VideoFormat = _choices("VideoFormat", "gif mp4")
ExplainMethod = _choices("ExplainMethod", "gradient input_x_gradient integrated_gradients smoothgrad lrp kernel_shap "
                         "lime perturbation", "Attribution methods (madistill/explain/attribution.py)")
ExplainTarget = _choices("ExplainTarget", "prob logit")
NeuronScore = _choices("NeuronScore", "grad ig probe")
RepairBaseline = _choices("RepairBaseline", "full last random")
RepairMask = _choices("RepairMask", "neurons fisher",
                      "What the masked repair frees (madistill/repair/masked.py): the chosen neurons' rows, or the "
                      "acting parameters with the largest empirical Fisher information of the fine-tuning loss.")
TrainingAttack = _choices("TrainingAttack", "kl ce targeted_lowest targeted_random",
                          "The inner adversaries of robust training (madistill/attacks/methods.py: training_attack).")
FailureAttack = _choices("FailureAttack", "random fgsm pgd pgd_strong spsa targeted_random targeted_lowest "
                         "targeted_lookahead",
                         "Suite attacks that craft on the repaired policy itself (critic needs a value head, "
                         "transfer a surrogate); targeted_lookahead plays episodes under the lookahead and repairs "
                         "against the targets it forced")
PurifierGradient = _choices("PurifierGradient", "through bpda ignore", "What white-box attacks on a purified policy "
                            "differentiate (madistill/policies/purified.py: attack_view).")
AlertScore = _choices("AlertScore", "obs surprise disagreement", "Online alert scores (madistill/cascade/alerts.py)")


def config_dir() -> str:
    """conf/ from the installed wheel, or the source tree's top-level conf/ (editable installs)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return str(packaged if packaged.is_dir() else here.parent / "conf")


class Checks:
    """One config section (``path``: its dotted key) with the range checks its schema's ``validate`` runs on
    it; a failing check raises one line naming the setting, what it must be and the value given."""

    def __init__(self, node: Any, path: str):
        self.node, self.path = node, path

    def require(self, ok: bool, key: str, must: str) -> None:
        """Refuse setting ``key`` unless ``ok``; ``must`` says what it must be (``"at least 1"``)."""
        if not ok:
            from omegaconf import OmegaConf

            value = self.node[key]
            shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            raise MadistillError(f"{self.path + '.' if self.path else ''}{key} must be {must}, got {shown}")

    def at_least(self, low: float, *keys: str) -> None:
        """Each of ``keys`` (unset ones skipped) at least ``low``."""
        for key in keys:
            self.require(self.node[key] is None or self.node[key] >= low, key, f"at least {low}")

    def above(self, low: float, *keys: str) -> None:
        """Each of ``keys`` (unset ones skipped) above ``low``."""
        for key in keys:
            self.require(self.node[key] is None or self.node[key] > low, key, f"above {low}")

    def widths(self, *keys: str) -> None:
        """Each of ``keys`` a list of layer widths, each at least 1 (an empty list: no hidden layer)."""
        for key in keys:
            self.require(all(int(w) >= 1 for w in self.node[key]), key, "a list of layer widths of at least 1")

    def finite(self, *keys: str) -> None:
        """Each of ``keys`` (unset ones skipped) a finite number."""
        for key in keys:
            self.require(self.node[key] is None or math.isfinite(self.node[key]), key, "a finite number")

    def within(self, low: float, high: float, *keys: str, open_low: bool = False, open_high: bool = False) -> None:
        """Each of ``keys`` (unset ones skipped) in [low, high]; ``open_low`` / ``open_high`` leave that end out."""
        interval = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        for key in keys:
            v = self.node[key]
            self.require(v is None or ((low < v if open_low else low <= v) and (v < high if open_high else v <= high)),
                         key, interval)


@dataclass
class EnvConfig:
    name: str = MISSING  # short id used in run paths and reports, e.g. simple_spread_v3
    target: str = MISSING  # import path of a PettingZoo env factory or module
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the env factory
    num_envs: int = 16  # env copies stepped together
    # worker processes stepping the copies (0: in this process); null: the backend's default, 2 for pettingzoo
    # (its copies step one at a time in Python) and 0 for batched (one set of array operations for all copies,
    # fastest in-process on 2 cores; docs/batched_mpe.md)
    num_workers: int | None = None
    grouping: Grouping = Grouping.auto  # auto: agents with equal spaces share a policy; per_agent: one each
    nan_policy: NanPolicy = NanPolicy.error  # what NaN/inf observations do: error (stop the run) or zero (read as 0)
    # auto | batched | pettingzoo: batched steps all copies of an mpe2 env with a numpy port at once
    # (madistill/envs/batched, same numbers as mpe2); auto picks it where a port exists, else pettingzoo
    backend: Backend = Backend.auto
    # Named feature groups per agent group for saliency, e.g. {listener: {landmark_0: [2, 3]}}; features
    # left out stay single (named by the env where it names them).
    features: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    lambda_igr: float = 1.0  # the DIGR weight tuned for this env (distill=digr reads it; plain sets 0)
    # Teams (sides) for the reports: team name -> agent ids or agent-name prefixes, every agent in exactly one,
    # e.g. +env.teams={adversaries: [adversary], good: [agent]}. Empty: inferred from the agent names (docs/teams.md).
    teams: dict[str, list[str]] = field(default_factory=dict)

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(1, "num_envs")
        c.at_least(0, "num_workers")


def changes_env(overrides: Sequence[str], saved_id: str | None = None) -> bool:
    """Whether command-line ``overrides`` pick another env than a saved policy's (id ``saved_id``):
    ``env=<another id>``, or a new ``env.name``/``env.target``/``env.kwargs``. Settings of how the env is
    stepped (``env.num_workers``, ``env.num_envs``, ...) keep the saved env."""
    for o in (o.lstrip("+~") for o in overrides):
        if o.startswith(("env.name", "env.target", "env.kwargs")) or (o.startswith("env=") and o != f"env={saved_id}"):
            return True
    return False


@dataclass
class PPOConfig:
    """Passed to stable_baselines3.PPO for every group (n_steps is per env copy and agent)."""

    learning_rate: float = 7e-4  # Adam step size
    n_steps: int = 100  # rollout steps per env copy and agent between updates
    batch_size: int = 1600  # agent-steps per minibatch
    n_epochs: int = 15  # passes over each rollout per update
    gamma: float = 0.99  # discount factor
    gae_lambda: float = 0.95  # GAE's bias-variance trade-off
    clip_range: float = 0.2  # PPO's clipping of the probability ratio
    ent_coef: float = 0.001  # weight of the entropy bonus
    vf_coef: float = 0.5  # weight of the value loss
    max_grad_norm: float = 0.5  # gradient norm clip
    target_kl: float | None = None  # stop an update's epochs early beyond this KL (null: never)
    # the update: madistill's fast_train (SB3's learning rule, less overhead per minibatch; SB3's own train() where
    # it does not support the policy, madistill/sb3_adapter.py), or false: SB3's PPO.train() always
    fast_update: bool = True
    # the fast update runs the critic's forward and backward pass in a second thread beside the actor's, on another
    # core (the same floats; not where a CNN encoder feeds both): false keeps the update in one thread
    critic_thread: bool = True

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(1, "n_steps", "batch_size", "n_epochs")
        c.above(0, "learning_rate", "clip_range", "max_grad_norm")
        c.finite("learning_rate")
        c.within(0, 1, "gamma", "gae_lambda")
        c.at_least(0, "ent_coef", "vf_coef", "target_kl")


@dataclass
class AnnealConfig:
    """Linear annealing of PPO settings over training: each one's value at the end as a fraction of its
    teacher.ppo (or group_ppo) value; None keeps it constant. teacher.anneal.learning_rate=0 is CleanRL's anneal_lr."""

    learning_rate: float | None = None  # end value as a fraction of the start value (null: constant)
    clip_range: float | None = None  # end value as a fraction of the start value (null: constant)
    ent_coef: float | None = None  # end value as a fraction of the start value (null: constant)

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(0, "learning_rate", "clip_range", "ent_coef")


@dataclass
class CNNConfig:
    """The CNN encoder of image observations (uint8 Box (H, W, C) or (C, H, W) in 0..255; docs/image_observations.md):
    unpadded convolutions (one entry per layer in each list) with ReLU, the last feature map average-pooled to at
    most max_grid x max_grid cells, then a linear layer to features_dim with ReLU. The defaults are SB3's NatureCNN."""

    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # output channels of each convolution
    kernels: list[int] = field(default_factory=lambda: [8, 4, 3])  # square kernel size of each convolution
    strides: list[int] = field(default_factory=lambda: [4, 2, 1])  # stride of each convolution
    max_grid: int = 8  # bounds the linear layer's input at channels[-1] * max_grid^2, whatever the image size
    features_dim: int = 512  # width of the encoder's output (the features the MLP layers read)

    @staticmethod
    def validate(c: Checks) -> None:
        layers = [len(c.node.channels), len(c.node.kernels), len(c.node.strides)]
        c.require(len(set(layers)) == 1 and layers[0] > 0, "channels", "a non-empty list as long as kernels and strides")
        for key in ("channels", "kernels", "strides"):
            c.require(min(c.node[key]) >= 1, key, "positive numbers")
        c.at_least(1, "max_grid", "features_dim")


@dataclass
class TeacherConfig:
    total_agent_steps: int = 1_000_000  # summed over agents and env copies
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])  # actor and critic MLP layer widths
    activation: Activation = Activation.tanh  # the MLPs' activation
    normalize_obs: bool = True  # normalise observations by running mean and std (policies act in these units)
    # Whether an agent cut off by the episode's time limit (truncated, not terminated) gets the critic's value of
    # its final observation as reward: right where the limit only cuts short an endless task or the observation
    # tells the time left. Off, the limit ends the return as a termination does (PettingZoo's
    # SuperSuit recipe for SB3 sees every end so; docs/continuous_actions.md).
    bootstrap_truncated: bool = True
    # "local": each agent's critic sees its own observation (independent PPO); "central": it sees the whole
    # team's observations of its env copy too (centralised training, decentralised execution, as in MAPPO).
    # The actor always sees only its own observation, so saved teachers act alike either way.
    critic: Critic = Critic.local
    cnn: CNNConfig = field(default_factory=CNNConfig)  # encoder of image observations, before hidden_sizes
    ppo: PPOConfig = field(default_factory=PPOConfig)
    checkpoint_every: int = 0  # agent steps between checkpoints (0: only at the end and on Ctrl-C)
    resume: str | None = None  # checkpoint directory to continue from
    # When each PPO update runs: "inline" after each rollout (SB3's strictly on-policy schedule), or in a
    # background "thread" overlapped with the next rollout, which is collected with the weights from before
    # that update (one update of policy lag, as in asynchronous PPO; docs/architecture.md, "Teacher update modes").
    update_mode: UpdateMode = UpdateMode.inline
    # Per-group PPO settings over teacher.ppo, by group name (heterogeneous groups often need their own), e.g.
    # +teacher.group_ppo.speaker.ent_coef=0.01. n_steps is shared: every group acts in the same rollouts.
    group_ppo: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Reward for actions that say what the agent observes (their pointwise mutual information; madistill/bonus.py),
    # by group name, e.g. +teacher.message_bonus.speaker=0.05: against a speaker that sends one message for two meanings.
    message_bonus: dict[str, float] = field(default_factory=dict)
    anneal: AnnealConfig = field(default_factory=AnnealConfig)

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(1, "total_agent_steps")
        c.at_least(0, "checkpoint_every")
        c.widths("hidden_sizes")


@dataclass
class StudentConfig:
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])  # the student MLP's layer widths
    activation: Activation = Activation.tanh  # the student MLP's activation
    # encoder of image observations, before hidden_sizes: compact (with hidden_sizes=[64, 64], 38k parameters on
    # 36x36x3 images, 1/8 of the default teacher's acting network)
    cnn: CNNConfig = field(default_factory=lambda: CNNConfig(channels=[16, 32], kernels=[8, 4], strides=[4, 2],
                                                             max_grid=4, features_dim=64))

    @staticmethod
    def validate(c: Checks) -> None:
        c.widths("hidden_sizes")


@dataclass
class DistillConfig:
    """DAgger collection + DIGR loss. lambda_igr = 0 is plain policy distillation."""

    teacher: str | None = None  # teacher run or policy directory (pipeline fills it)
    rounds: int = 4  # DAgger rounds; round 0 is the teacher alone
    agent_steps_per_round: int = 40_000  # live agent-steps collected per round
    beta_start: float = 0.5  # probability the teacher acts (per agent and step) in round 1
    beta_decay: float = 0.5  # ... multiplied by this every later round
    deterministic: bool = False  # collect with greedy instead of sampled actions
    updates_per_round: int = 1000  # minibatch steps per group after each round, on all data so far
    batch_size: int = 512  # observations per minibatch step
    learning_rate: float = 1e-3  # Adam step size of the student
    # learning rate at the last update, as a share of learning_rate (cosine decay over all rounds' updates;
    # 1 keeps it constant). Adversarial training gains clean and robust accuracy when the rate anneals.
    lr_final: float = 1.0
    # decay of an exponential moving average of the student's weights, which becomes the saved student (0: off)
    weight_average: float = 0.0
    max_grad_norm: float = 1.0  # gradient norm clip
    divergence: Divergence = Divergence.kl  # how the student matches the teacher (madistill/common/divergences.py)
    temperature: float = 1.0  # teacher softmax temperature (Box: scales the teacher's variance)
    lambda_igr: float = 1.0  # weight of the selective input-gradient penalty
    mask: Mask = Mask.threshold  # how teacher saliency becomes feature relevance
    topk: int = 3  # groups kept relevant by mask=topk
    threshold: float = 0.2  # saliency at or above which a group is relevant (mask=threshold)
    target: GradientTarget = GradientTarget.log_prob  # f_S whose input gradient is regularised
    heldout_fraction: float = 0.1  # share of visited observations kept for agreement metrics
    # Robust distillation (adversarial term): PGD on the student within adv_eps (normalised units, features in
    # attack.exclude kept), eps ramped linearly from 0 over the first adv_ramp share of the updates.
    adv_weight: float = 0.0  # weight of divergence(teacher(x) || student(x + delta))
    smooth_weight: float = 0.0  # weight of KL(student(x) || student(x + delta))
    adv_eps: float = 0.3  # radius of the PGD perturbation (normalised units)
    adv_steps: int = 3  # PGD steps of the adversarial term
    # kl (policy divergence), ce (flip the greedy action, FGSM's objective), both (per sample the worse),
    # targeted_lowest / targeted_random (force the lowest-ranked of attack.target_candidates actions / a random
    # one: the suite's targeted attacks) or all (per sample the worst of kl, ce and targeted_lowest)
    adv_objective: AdvObjective = AdvObjective.kl
    adv_fgsm: bool = False  # per sample, the worse of that PGD's point and FGSM's (one full signed step on ce)
    adv_ramp: float = 0.5  # share of the updates over which adv_eps grows from 0
    adv_collect: float = 0.0  # chance per env copy and step that DAgger collection runs under attack
    # the attack it runs under: null, adv_objective's (a combined one's greedy-action flip); or a robust
    # fine-tuning objective, targeted_lookahead included (the student then visits the states the lookahead
    # drives it to, labelled by the teacher; envs that branch, Discrete actions), or director (trained against the
    # student before each round it acts in, attack.director_retrain_steps)
    adv_collect_objective: PGDObjective | None = None
    # with adv_collect_objective=targeted_lookahead: record the target the lookahead forced on each collected
    # observation, and force it on the student again in the adversarial term (one more candidate point per sample)
    adv_collect_targets: bool = False

    @staticmethod
    def validate(c: Checks) -> None:
        # zero rounds, steps or updates would save an untrained student
        c.at_least(1, "rounds", "agent_steps_per_round", "updates_per_round", "batch_size", "adv_steps", "topk")
        c.at_least(0, "lambda_igr", "adv_weight", "smooth_weight", "adv_eps")
        c.above(0, "temperature", "learning_rate", "max_grad_norm")
        c.finite("learning_rate")
        c.within(0, 1, "beta_start", "beta_decay", "heldout_fraction", "adv_ramp", "adv_collect")
        c.require(not c.node.adv_collect_targets or (c.node.adv_collect_objective == "targeted_lookahead"
                                                      and c.node.adv_collect > 0), "adv_collect_targets",
                  "false unless distill.adv_collect > 0 and distill.adv_collect_objective=targeted_lookahead (the "
                  "targets are the lookahead's)")
        c.within(0, 1, "lr_final", open_low=True)
        c.within(0, 1, "weight_average", open_high=True)


@dataclass
class FinetuneConfig:
    """Robust RL fine-tuning of a distilled student (``madistill finetune``, SA-PPO): PPO on the env's return,
    from the student's actor and its teacher's critic, with a smoothness regulariser in every minibatch step.
    The other PPO settings are teacher.ppo's; the budget respects attack.exclude and attack.scale."""

    policy: str | None = None  # the student's run or policy directory
    total_agent_steps: int = 1_000_000  # summed over agents and env copies
    learning_rate: float = 1e-4  # lower than a fresh teacher's: the actor starts trained
    smooth_weight: float = 0.03  # weight of KL(pi(x) || pi(x + delta)), delta PGD's maximiser within the budget
    eps: float = 0.2  # the l_inf radius of the regulariser and the collection attack (normalised units)
    steps: int = 3  # PGD steps of the inner maximisation
    ramp: float = 0.2  # share of training over which the regulariser's eps grows linearly from 0
    attack_fraction: float = 0.5  # share of env copies and steps played under PGD on the acting team (radius eps)
    # the attack on those steps: PGD on ce (flip the greedy action) or kl, targeted_lowest / targeted_random (the
    # suite's targeted PGDs), or targeted_lookahead (the action a branch of the episode shows most harmful, with
    # attack.lookahead_horizon and attack.lookahead_gamma; envs that branch, Discrete actions), or director (the
    # learned PA-AD director, retrained against the student being tuned every director_every agent-steps)
    attack_objective: PGDObjective = PGDObjective.ce
    director_every: int = 100_000  # attack_objective=director: agent-steps of fine-tuning between its trainings
    # checkpoint selection: the saved student is the best-scoring of the start and every select_every steps
    select_every: int = 50_000  # agent-steps between validations (0: save the last policy, validate nothing)
    select_episodes: int = 50  # validation episodes per candidate and attack (the same seeds for every candidate)
    select_attacks: list[ValidationAttack] = field(  # validation attacks (all agents victims, radius eps)
        default_factory=lambda: [ValidationAttack.fgsm, ValidationAttack.pgd])
    select_robust_weight: float = 0.5  # score = (1 - w) * clean + w * worst validation team return

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(1, "total_agent_steps", "steps", "select_episodes", "director_every")
        c.above(0, "learning_rate")
        c.at_least(0, "smooth_weight", "eps", "select_every")
        c.within(0, 1, "ramp", "attack_fraction", "select_robust_weight")


@dataclass
class SaliencyConfig:
    # perturbation baseline: mean (normaliser mean) or marginal (other observations)
    baseline: SaliencyBaseline = SaliencyBaseline.mean
    baseline_samples: int = 4  # draws per observation for the marginal baseline
    # what gradient saliency explains: log_prob or logit of the chosen action
    target: GradientTarget = GradientTarget.log_prob
    topk: int = 3  # k of the top-k overlap metric
    policy: str | None = None  # saliency stage: run or policy directory
    obs: str | None = None  # saliency stage: .npz of raw observations per group (default: roll out the policy)
    episodes: int = 20  # saliency stage: episodes rolled out when no observations are given
    rows: int = 50  # observations shown in the per-observation heatmap
    # image groups: pixels are grouped into square patches of this side (all channels) for saliency, DIGR and
    # attack.exclude names (patch_<row>_<col>); 1 keeps every flattened pixel value its own feature
    image_patch: int = 6

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(1, "baseline_samples", "topk", "episodes", "rows", "image_patch")


@dataclass
class ExplainConfig:
    """Attribution methods and their quality metrics (``madistill explain``, docs/explain.md)."""

    policy: str | None = None  # run or policy directory whose policies are explained (a student's teacher added)
    obs: str | None = None  # .npz of raw observations per group (default: greedy episodes of the teacher)
    episodes: int = 10  # episodes rolled out when no observations are given
    max_observations: int = 256  # observations explained per group (evenly spaced over those collected)
    methods: list[ExplainMethod] = field(default_factory=lambda: list(ExplainMethod))  # attribution methods compared
    target: ExplainTarget = ExplainTarget.prob  # what maps explain of the chosen action (Discrete); Box: the mean either way
    ig_steps: int = 32  # integration points of integrated gradients
    smoothgrad_samples: int = 16  # noisy copies per observation for SmoothGrad
    smoothgrad_sigma: float = 0.3  # SmoothGrad's noise std, in normalised units (feature stds)
    shap_samples: int = 128  # KernelSHAP coalitions per observation (all 2^G when fewer would do: exact values)
    lime_samples: int = 128  # LIME random coalitions per observation
    lime_width: float = 0.75  # LIME kernel width on the cosine distance between a coalition and the full input
    lrp_epsilon: float = 1.0e-6  # LRP-epsilon stabiliser added to each layer's pre-activations
    random_orders: int = 8  # random group orders averaged for the deletion/insertion floor
    ood_k: float = 3.0  # a masked input is out of distribution beyond this many normaliser stds on a feature
    infidelity_samples: int = 32  # perturbations per observation for infidelity
    infidelity_sigma: float = 0.3  # std of infidelity's group-wise Gaussian perturbations, in normalised units
    sensitivity_samples: int = 8  # perturbations per observation for max-sensitivity
    sensitivity_radius: float = 0.1  # l_inf radius of max-sensitivity's uniform perturbations, in normalised units
    randomisation: bool = True  # cumulative layer re-initialisation check (MLP policies)
    randomisation_draws: int = 16  # independent re-initialisations per policy in the randomisation check
    # the check passes where the CI of the correlation with every layer re-initialised lies within +- this
    # (|rho| < 0.2: "very weak" on the usual scale)
    randomisation_tolerance: float = 0.2
    # suite attack whose perturbations test the maps' stability at every attack.eps (its settings: attack.*);
    # null skips the check
    attack: ValidationAttack | None = ValidationAttack.pgd
    n_boot: int = 1000  # bootstrap resamples for the CIs

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(1, "episodes", "max_observations", "ig_steps", "smoothgrad_samples", "shap_samples", "lime_samples",
                   "random_orders", "infidelity_samples", "sensitivity_samples", "randomisation_draws", "n_boot")
        c.at_least(0, "smoothgrad_sigma", "lrp_epsilon", "infidelity_sigma", "sensitivity_radius")
        c.above(0, "lime_width", "ood_k")
        c.within(0, 1, "randomisation_tolerance")
        c.require(len(c.node.methods) > 0, "methods", "a non-empty list")


@dataclass
class AttackConfig:
    """Robustness evaluation (``madistill attack``) and the attack settings robust distillation uses."""

    policy: str | None = None  # run, policy or sweep directory to attack
    # the targeted attacks force a chosen action (docs/attacks.md); targeted_lookahead is skipped, with a note,
    # where the env cannot branch (Box actions, episodes that do not follow from their seed). Add "learned" for
    # the PPO adversary (trained per victim set and eps: attack.learned_steps each), "director" for a PPO
    # director whose target actions targeted PGD forces (attack.director_*), "offsets" for the constant-offset
    # search (attack.offset_candidates replays of every episode), "targeted_random" for the targeted floor
    methods: list[AttackMethod] = field(default_factory=lambda: [AttackMethod(m) for m in (
        "random fgsm pgd critic spsa transfer targeted_lowest targeted_lookahead".split())])
    eps: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])  # l_inf radii in normalised units (stds)
    victims: list[str] = field(default_factory=lambda: ["all", "each"])  # all | each | <agent> | team:<name> | <a>+<b>
    frequency: float = 1.0  # share of steps attacked (per env copy)
    # group -> features never perturbed (index or feature-group name): +attack.exclude.speaker=[goal_0]
    exclude: dict[str, list[str]] = field(default_factory=dict)
    # group -> feature (index or feature-group name) -> its radius as a multiple of eps (a per-feature eps):
    # +attack.scale.listener.message=0.5. Training attacks (distill=robust) use it too.
    scale: dict[str, dict[str, float]] = field(default_factory=dict)
    steps: int = 10  # PGD / SPSA iterations
    restarts: int = 3  # KL is flat at delta = 0, so PGD relies on random starts: one restart is weak
    step_size: float = 1.0  # PGD / SPSA first step = step_size * eps, halved per sample when it does not improve
    spsa_samples: int = 32  # random directions per SPSA gradient estimate
    spsa_delta: float = 0.3  # SPSA finite-difference scale, relative to eps
    critic: str | None = None  # policy whose value heads the critic attack uses (default: the teacher)
    transfer_from: str | None = None  # surrogate for the transfer attack (default: the teacher <-> its student)
    learned_steps: int = 200_000  # env steps of PPO training for each learned adversary
    learned_envs: int = 4  # env copies the learned adversary trains in
    # SB3 PPO arguments of the learned adversary
    learned_ppo: dict[str, Any] = field(default_factory=lambda: {"n_steps": 128, "batch_size": 256,
                                                                 "learning_rate": 3e-4, "ent_coef": 0.0})
    # the PA-AD director (trained per victim set and eps): per victim a target action / target mean, realised by
    # the targeted PGD of targeted_* (attack.steps, attack.restarts) at every env step of training
    director_steps: int = 100_000  # env steps of PPO training for each director
    # env copies the director trains in: their targets are forced in one batch, so more copies cost less per step
    director_envs: int = 32
    # SB3 PPO arguments of the director (a rollout of n_steps x director_envs env steps)
    director_ppo: dict[str, Any] = field(default_factory=lambda: {"n_steps": 64, "batch_size": 512,
                                                                  "learning_rate": 1e-3, "ent_coef": 0.0})
    # Discrete victims: the director's rank k forces the k-th lowest-ranked action the budget reaches (every action
    # forced at once, n actions x the PGD rows); false: the k-th lowest-ranked action, reached or not, which
    # commits the director to targets the budget may miss (docs/attacks.md)
    director_reachable: bool = True
    # robust training against the director (finetune.attack_objective=director, distill.adv_collect_objective=
    # director; ATLA-style alternation): env steps it trains against the current policy before training starts
    # and at every alternation (each DAgger round where the student acts; every finetune.director_every agent-steps)
    director_retrain_steps: int = 32_768
    offset_candidates: int = 20  # constant offsets the "offsets" attack replays every episode with
    target_candidates: int = 4  # targeted_lowest (Discrete): lowest-ranked actions tried at once, the lowest reached wins
    lookahead_horizon: int = 1  # targeted_lookahead and fault=worst: greedy team steps each branch plays after the candidate action
    lookahead_gamma: float = 0.99  # targeted_lookahead and fault=worst: discount of a branch's rewards and of the critic's value at its horizon
    # targeted_lookahead: add the critic attack's critic's discounted value at the horizon to a branch's return
    # (off: a value head's errors can outweigh the reward differences between the branches)
    lookahead_critic: bool = False
    # targeted_lookahead: the most joint actions of a victim set branched per step (the product of the victims'
    # action counts); a larger set chooses each victim's target with the others at their clean actions
    lookahead_joint: int = 64
    # targeted_lookahead: PGD restarts of its forcing (the other settings are attack.steps, attack.step_size). A
    # sample stops once its target is greedy, so restarts cost only where a target is hard or out of reach, and
    # the hard ones can be the harmful ones (docs/attacks.md)
    lookahead_restarts: int = 9
    episodes: int = 50  # episodes per attack, victim set and eps
    seed: int = ATTACK_SEED  # first episode seed (madistill/seeds.py: the seed namespaces)
    checks: bool = True  # gradient-masking checks (adds strong PGD at the middle eps and a collapse run)
    collapse_eps: float = 3.0  # PGD here on all agents should leave under half the gain over random
    masking_tolerance: float = 0.1  # return differences below this share of the clean gain are not flagged
    # objective_misses_return: a targeted attack must lower the return by more than this share of the clean gain
    # below the strongest untargeted one (with a paired CI excluding zero)
    objective_tolerance: float = 0.1
    probe_observations: int = 512  # observations for the objective-level checks
    probe_tolerance: float = 0.5  # an objective-level flag needs one attack to reach (1 + this) x the other's KL
    n_boot: int = 1000  # bootstrap resamples for the report's CIs and the masking checks

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(1, "episodes", "steps", "restarts", "spsa_samples", "offset_candidates", "target_candidates",
                   "learned_steps", "learned_envs", "lookahead_joint", "lookahead_restarts", "director_steps",
                   "director_envs", "director_retrain_steps")
        c.at_least(0, "lookahead_horizon", "objective_tolerance")
        c.within(0, 1, "lookahead_gamma")
        c.within(0, 1, "frequency")
        c.require(len(c.node.eps) > 0 and all(0 <= e < math.inf for e in c.node.eps), "eps",
                  "a non-empty list of finite radii at least 0")
        c.require(len(c.node.victims) > 0, "victims", "a non-empty list of victim sets (all, each, an agent id, ...)")
        c.require(len(c.node.methods) > 0, "methods", "a non-empty list of attacks")
        c.at_least(0, "seed")
        c.require(all(m >= 0 for by_feature in c.node.scale.values() for m in by_feature.values()), "scale",
                  "multiples of eps at least 0")
        # one offset holds for a whole episode, so it cannot attack only some of its steps
        c.require("offsets" not in c.node.methods or c.node.frequency == 1, "frequency",
                  "1 with offsets in attack.methods (or drop offsets)")


@dataclass
class AlertConfig:
    """Online alerts of the cascade monitor (docs/cascade.md, Online alerts): per agent and score, a threshold
    calibrated on clean episodes to a target false-alarm rate."""

    # evaluate and cascade calibrate a monitor per policy and watch their episodes with it (reports/alerts.json);
    # off by default, as calibration plays calibration_episodes more episodes per policy
    enabled: bool = False

    # scores per agent and step: obs (largest |z| of the normalised observation), surprise (-log prob of the
    # action taken), disagreement (KL from the reference policy's action distribution)
    scores: list[AlertScore] = field(default_factory=lambda: [AlertScore.obs, AlertScore.surprise])
    reference: str | None = None  # run or policy directory the disagreement score compares with (e.g. the teacher)
    # target share of clean episodes with any alert, split evenly over agents and scores
    false_alarm_rate: float = 0.01
    # clean episodes the thresholds are calibrated on: at least agents x scores / false_alarm_rate - 1
    calibration_episodes: int = 1200
    calibration_seed: int = ALERT_CALIBRATION_SEED  # their first episode seed (madistill/seeds.py: the seed namespaces)
    # the smallest threshold of any score (standard deviations for obs, nats for surprise and disagreement): a score
    # that clean episodes keep at float rounding (a student matching its reference exactly) would otherwise get a
    # threshold that other rounding (hardware, batch size) crosses on clean episodes
    min_threshold: float = 1e-6

    @staticmethod
    def validate(c: Checks) -> None:
        c.require(len(c.node.scores) > 0 and len(set(c.node.scores)) == len(c.node.scores), "scores",
                  "a non-empty list of distinct scores")
        c.within(0, 1, "false_alarm_rate", open_low=True, open_high=True)
        c.at_least(1, "calibration_episodes")
        c.at_least(0, "min_threshold")


@dataclass
class RepairConfig:
    """Neuron localisation and gradient-masked repair (``madistill repair``, docs/repair.md)."""

    policy: str | None = None  # run or policy directory whose policy is repaired (a run's teacher, else its only policy)
    group: str | None = None  # agent group to repair (default: the Discrete group with the most failures)
    failures: str | None = None  # .npz of raw observations `obs` [N, d] and wanted `actions` [N]; default: built with the attack
    # the attack suite member that builds the failure set. targeted_lookahead: `episodes` episodes with every
    # agent under the lookahead (attack.* settings); the failures are the states where the target it forced
    # (re-forced on the original by `adv_steps` targeted PGD steps) is taken, and every variant is fine-tuned with
    # robust distillation's loss (`adv_weight`, `smooth_weight`) on those states and the clean anchor, the
    # recorded target forced anew on the policy being tuned as one more adversarial candidate per state
    attack: FailureAttack = FailureAttack.pgd
    eps: float | None = None  # its l_inf radius in stds (default: the middle of attack.eps, the suite's middle budget)
    # clean episodes whose observations are attacked (failure set) and anchor clean behaviour; with
    # attack=targeted_lookahead, as many more episodes are played under the lookahead
    episodes: int = 20
    max_failures: int = 4096  # failing observations kept at most
    score: NeuronScore = NeuronScore.grad  # neuron scores: activation x gradient, integrated gradients, sparse probe
    ig_steps: int = 16  # integrated gradients: points on the path from the ablated to the actual units
    probe_l1: float = 0.001  # sparse probe: L1 penalty on its weights
    probe_steps: int = 300  # sparse probe: Adam steps of its logistic regression
    neurons: float = 0.03  # share of the hidden neurons repaired (at least one)
    max_parameters: float = 0.05  # most of the policy's acting parameters the repair may change (drops lowest-scored neurons)
    # what the masked repair frees: `neurons`, the chosen neurons' weight rows and biases; `fisher`, the
    # max_parameters share of the acting parameters whose squared gradients of the fine-tuning loss, summed over
    # `fisher_batches` minibatches at the original, are largest (the random baseline then frees as many random
    # acting parameters). The neurons are scored and ablation-checked in both.
    mask: RepairMask = RepairMask.neurons
    fisher_batches: int = 16  # minibatches of the fine-tuning loss whose squared gradients score mask=fisher
    ablation_draws: int = 20  # random neuron sets of the same size the chosen neurons' ablation is compared to
    steps: int = 300  # fine-tuning steps (every variant: masked and baselines)
    batch_size: int = 256  # failing and as many clean observations per step
    # AdamW learning rates tried per variant, each with every weight of `anchors`; each variant keeps the pair
    # chosen on the validation split
    learning_rates: list[float] = field(default_factory=lambda: [0.0001, 0.001, 0.01])
    # weights of the clean anchor (divergence to the original policy on clean observations) tried per variant
    anchors: list[float] = field(default_factory=lambda: [1.0, 10.0, 100.0])
    validation: float = 0.25  # share of the failure set and of the clean anchor held out to choose rate and anchor
    max_divergence: float = 0.02  # bound on the held-out clean anchor's mean divergence for a pair to be chosen
    weight_decay: float = 0.01  # AdamW weight decay (masked parameters stay bit-identical regardless)
    divergence: Divergence = Divergence.kl  # the anchor's divergence
    baselines: list[RepairBaseline] = field(default_factory=lambda: list(RepairBaseline))  # also fine-tuned, same data and steps
    evaluate: bool = True  # clean and attacked returns of the original and every variant (attack.* settings, at eps)
    # adversarial repair: every `refresh` fine-tuning steps the failure set is rebuilt by the training attack
    # `adv_objective` (`adv_steps` PGD steps, at eps) on the policy being tuned, from the clean anchor observations,
    # and the held-out choice judges robust accuracy under `attack` on each fine-tune; 0: the fixed failure set
    # built on the original policy (needed for repair.failures files, whose wanted actions are not the clean ones)
    refresh: int = 0
    adv_objective: TrainingAttack = TrainingAttack.ce  # ce: flip the clean greedy action, what a failure is
    # PGD steps of that training attack (one restart; it runs at every refresh); with attack=targeted_lookahead
    # the targeted PGD steps that force the lookahead's targets and those of the loss's adversarial point
    adv_steps: int = 10
    # repair.attack=targeted_lookahead: weights of robust distillation's adversarial term (the KL from the
    # original's clean head at the worse of PGD-on-KL's point and the forced target's) and smoothness term (the
    # tuned policy at the clean point against itself at that point); the other terms as distill=robust's
    adv_weight: float = 1.0
    smooth_weight: float = 0.5  # weight of the smoothness term (repair.attack=targeted_lookahead)

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(1, "episodes", "max_failures", "ig_steps", "probe_steps", "ablation_draws", "steps", "batch_size",
                   "adv_steps", "fisher_batches")
        c.within(0, 1, "neurons", "max_parameters", open_low=True)
        c.above(0, "eps")
        c.require(len(c.node.learning_rates) > 0 and min(c.node.learning_rates) > 0, "learning_rates",
                  "a non-empty list of rates above 0")
        c.require(len(c.node.anchors) > 0 and min(c.node.anchors) >= 0, "anchors", "a non-empty list of weights at least 0")
        c.within(0, 1, "validation", open_low=True, open_high=True)
        c.at_least(0, "probe_l1", "weight_decay", "max_divergence", "refresh", "adv_weight", "smooth_weight")
        lookahead = c.node.attack == "targeted_lookahead"
        c.require(not (lookahead and c.node.refresh), "refresh", "0 with repair.attack=targeted_lookahead, which "
                  "forces the lookahead's targets anew on the policy being tuned at every step")
        c.require(not (lookahead and c.node.failures is not None), "failures", "null with "
                  "repair.attack=targeted_lookahead, which finds its failures by playing episodes under the lookahead")


@dataclass
class LoggerConfig:
    tensorboard: bool = True  # TensorBoard event files in the run's tb/
    progress: bool = True  # progress bars with rate and ETA
    figures: bool = True  # PNG figures in reports/ (and images in TensorBoard)


@dataclass
class PurifyConfig:
    """The purification defence (``madistill purify``, docs/purification.md): a denoiser per agent group trained on
    a teacher's clean observations, and the setting that puts it in front of the policies of every stage."""

    teacher: str | None = None  # run or policy directory whose clean observations the purifier learns (purify stage)
    # any stage: a purifier (a purify run, or its purifier/ directory) in front of every policy it loads
    purifier: str | None = None
    # what white-box attacks on purified policies differentiate: through (the adaptive attack), bpda (the purifier's
    # forward pass, identity gradient) or ignore (the undefended policy: attacks unaware of the purifier)
    gradient: PurifierGradient = PurifierGradient.through
    eot_samples: int = 1  # > 1: attacks average the head over this many draws of a randomised purifier's noise (EOT)
    agent_steps: int = 100_000  # clean agent-steps of the teacher collected as training data
    deterministic: bool = False  # greedy teacher actions while collecting (false: sampled, wider coverage)
    eps: float = 1.0  # largest l_inf radius (normalised units) of the training perturbations; radii are uniform below it
    sign_share: float = 0.5  # share of training perturbations at a corner of their ball (the rest uniform inside it)
    noise: float = 0.0  # std of the Gaussian noise added before denoising, at training and inference (0: deterministic)
    clip: bool = True  # clip each purified feature to the range it took in the clean data
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])  # the denoiser MLP's hidden layers
    activation: Activation = Activation.relu  # the denoiser's activation
    epochs: int = 30  # passes over the training data
    batch_size: int = 512  # observations per Adam step
    learning_rate: float = 0.001  # Adam
    validation: float = 0.1  # share of the data held out for the report's reconstruction errors
    episodes: int = 100  # clean episodes (eval.seed ...) of the teacher with and without the purifier, for the report

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(1, "eot_samples", "agent_steps", "epochs", "batch_size", "episodes")
        c.widths("hidden_sizes")
        c.at_least(0, "eps", "noise")
        c.within(0, 1, "sign_share")
        c.within(0, 1, "validation", open_low=True, open_high=True)
        c.above(0, "learning_rate")


@dataclass
class EvalConfig:
    policy: str | None = None  # run or policy directory (evaluate stage); pipeline fills it
    names: list[str] = field(default_factory=list)  # which policies of a run dir (empty: all)
    # also evaluate the teacher a student was distilled from (its manifest's distill.teacher), as distill's and
    # finetune's reports show it, with the student's retention
    with_teacher: bool = False
    episodes: int = 100  # episodes per policy
    seed: int = EVAL_SEED  # episode seeds seed..seed+episodes-1 (madistill/seeds.py: the seed namespaces)
    deterministic: bool = True  # greedy actions (false: sampled)
    # sampled actions (deterministic=false, the random team) from one stream per episode, so they do not
    # depend on env.num_envs; off: one stream shared by the copies, which docs/results.md's sampled rows use
    episode_streams: bool = False
    random_baseline: bool = True  # also evaluate a uniform-random team for reference
    n_boot: int = 2000  # bootstrap resamples for the 95% CIs
    video: bool = False  # save a GIF of one episode from the env's rgb_array render
    video_format: VideoFormat = VideoFormat.gif  # mp4 needs imageio[ffmpeg]

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(1, "episodes", "n_boot")
        c.at_least(0, "seed")


@dataclass
class FaultConfig:
    """A fault injected into agents (``conf/fault/``, one file per fault; docs/cascade.md): what goes wrong,
    to whom, from when, for how long."""

    name: str = "random"  # which fault: a name registered in madistill.cascade.faults.FAULTS (another is refused with their list)
    victims: list[str] = field(default_factory=list)  # faulted agent ids (empty: the cascade stage takes each agent in turn)
    onset: int = 5  # episode step at which the fault starts
    # with a value, each episode's onset is drawn uniformly from onset..onset_max by its episode seed (null: fixed)
    onset_max: int | None = None
    duration: int | None = 1  # steps the fault lasts: 1 is an impulse, null lasts to the episode's end
    rate: float = 1.0  # intermittency: the chance that the fault acts at each step of its duration
    sigma: float = 1.0  # noise: standard deviation of the added Gaussian noise (normalised units)
    # noise and dropout: the observation features hit, by index or feature-group name (env.features, e.g. a
    # listener's message: a communication fault); empty: every feature
    features: list[str] = field(default_factory=list)
    action: list[float] = field(default_factory=lambda: [0.0])  # constant: the action (Discrete: one index; Box: one value per component or one for all)
    method: str = "pgd"  # attack: one of the attack suite's per-step attacks (FAULT_METHODS in madistill/cascade/faults.py)
    eps: float = 0.3  # attack: the l_inf budget in normalised units (attack.exclude and attack.scale apply)
    seed: int = 0  # seeds the fault's own draws (onsets, noise, random actions) together with each episode seed

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(0, "onset", "sigma", "eps")
        c.require(c.node.onset_max is None or c.node.onset_max >= c.node.onset, "onset_max", "null or at least fault.onset")
        c.at_least(1, "duration")
        c.within(0, 1, "rate", open_low=True)


@dataclass
class CascadeConfig:
    """The cascade monitor (``madistill cascade``): paired clean and faulted rollouts of the same episodes
    measure how a fault on one agent propagates to the others (docs/cascade.md)."""

    policy: str | None = None  # run or policy directory to study
    episodes: int = 20  # paired (clean, faulted) episodes per fault
    seed: int = CASCADE_SEED  # episode seeds seed..seed+episodes-1 (madistill/seeds.py: the seed namespaces)
    deterministic: bool = False  # greedy actions; false samples them from one stream per episode, the same in both twins
    lags: int = 5  # K: the influence matrix covers lags 1..K steps after an impulse
    onsets: list[int] = field(default_factory=lambda: [3, 8])  # episode steps of the influence matrix's impulses
    impulse: str = "random"  # the action fault (a name in conf/fault/) whose one-step impulses measure influence
    min_effect: float = 1e-6  # an influence counts as significant when its CI's lower bound exceeds this
    # a non-faulted agent fails when its action distribution's total variation from its clean twin exceeds this
    # (raised to the largest deviation seen between clean twins, should the env's replays differ)
    threshold: float = 0.1
    # with sampled actions, the threshold is raised to this quantile of the noise floor: per episode and agent, the
    # largest TV between clean twins sampling from independent streams, the deviation sampling alone causes
    # (null: no noise floor)
    noise_quantile: float | None = 0.95
    # a non-faulted agent also fails once its reward summed since the onset falls this far below its clean twin's
    # (null: deviation only)
    return_loss: float | None = None
    replay_episodes: int = 3  # clean episodes played twice before measuring, to refuse non-reproducible envs
    # the most env copies a paired run steps side by side (each fault's block holds one copy per episode): a study
    # of more plays its episodes in rounds, with the same numbers; each PettingZoo copy is a whole env in memory
    max_copies: int = 2048
    n_boot: int = 1000  # bootstrap resamples for the CIs
    confidence: float = 0.95  # two-sided coverage of the CIs

    @staticmethod
    def validate(c: Checks) -> None:
        c.at_least(1, "episodes", "lags", "replay_episodes", "max_copies", "n_boot")
        c.at_least(0, "seed")
        c.require(len(c.node.onsets) > 0 and min(c.node.onsets) >= 0, "onsets", "a non-empty list of steps at least 0")
        c.at_least(0, "min_effect", "threshold", "return_loss")
        c.within(0, 1, "confidence", open_low=True, open_high=True)
        c.within(0, 1, "noise_quantile")


@dataclass
class Config:
    env: EnvConfig = MISSING
    teacher: TeacherConfig = MISSING
    logger: LoggerConfig = MISSING
    student: StudentConfig = MISSING
    distill: DistillConfig = MISSING
    finetune: FinetuneConfig = MISSING
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    attack: AttackConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    seed: int = 0  # seeds initial weights, action sampling and training episodes (eval.seed: evaluation's)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    torch_threads: int = 1  # small MLPs run fastest single-threaded; the env workers use the other cores
    # teachers and students with more parameters than this get a one-line warning (cause and fix) before training
    warn_parameters: int = 10_000_000


@dataclass(frozen=True)
class ConfigSection:
    """A config section a stage adds to :class:`Config` (``madistill.stages.registry.Stage.adds``)."""

    name: str  # its key in the config (``cascade``), and its config group's directory conf/<name>/ for presets
    schema: type  # its dataclass schema; the comments on its fields are their descriptions in the stage's help
    # the conf/<name>/<preset>.yaml composed by default (None: the schema's defaults, stored as option base_<name>)
    preset: str | None = None

    @property
    def default(self) -> str:
        """The config group option composed unless the command line picks another (``<name>=<option>``)."""
        return self.preset or f"base_{self.name}"


_ADDED: list[ConfigSection] = []  # the sections the registered stages add (use_sections)


def use_sections(sections: Sequence[ConfigSection]) -> None:
    """Make ``sections`` part of the config (schema, overrides, help), replacing those set before."""
    names = [s.name for s in sections]
    clash = sorted({n for n in names if n in _field_types(Config) or names.count(n) > 1})
    if clash:
        raise ValueError(f"config sections {clash} are added twice (Config or another stage has them)")
    _ADDED[:] = sections


def root_schema() -> type:
    """:class:`Config` with the sections the registered stages add."""
    return _root_schema(tuple(_ADDED))


@functools.cache
def _root_schema(sections: tuple[ConfigSection, ...]) -> type:
    if not sections:
        return Config
    root = make_dataclass("Config", [(s.name, s.schema, field(default=MISSING)) for s in sections], bases=(Config,))
    root.__module__ = __name__  # its own fields' descriptions are Config's, in this file
    return root


def schema_defaults() -> dict[str, Any]:
    """Every setting's default in the schemas, by its dotted key (``{"teacher.ppo.learning_rate": 0.0003, ...}``),
    a choice as its plain name: what a run's settings are compared with to find those it sets."""
    out: dict[str, Any] = {}

    def leaf(key: str, value: Any) -> None:
        if isinstance(value, dict):  # a dict-typed setting's default entries (attack.learned_ppo.n_steps, ...)
            for k, v in value.items():
                leaf(f"{key}.{k}", v)
        elif isinstance(value, list):
            out[key] = [v.value if isinstance(v, Enum) else v for v in value]
        else:
            out[key] = value.value if isinstance(value, Enum) else value

    def walk(schema: type, instance: Any, prefix: str) -> None:
        for name, tp in _field_types(schema).items():
            value = getattr(instance, name)
            if is_dataclass(tp):
                walk(tp, value if is_dataclass(value) else tp(), f"{prefix}{name}.")
            else:
                leaf(prefix + name, value)

    schema = root_schema()
    walk(schema, schema(), "")
    return out


def register_configs() -> None:
    """Register the typed schemas with Hydra's ConfigStore, so a bad override fails at composition. Each added
    section is a config group whose default option the root schema's own defaults list composes."""
    cs = ConfigStore.instance()
    root = root_schema()
    if _ADDED:  # Hydra reads a structured config's defaults list from its `defaults` field
        defaults = ["_self_", *({s.name: s.default} for s in _ADDED)]
        root = make_dataclass("Config", [("defaults", list[Any], field(default_factory=lambda: defaults))],
                              bases=(root,))
    cs.store(name="base_config", node=root)
    cs.store(group="env", name="base_env", node=EnvConfig)
    cs.store(group="teacher", name="base_teacher", node=TeacherConfig)
    cs.store(group="logger", name="base_logger", node=LoggerConfig)
    cs.store(group="student", name="base_student", node=StudentConfig)
    cs.store(group="distill", name="base_distill", node=DistillConfig)
    cs.store(group="finetune", name="base_finetune", node=FinetuneConfig)
    cs.store(group="attack", name="base_attack", node=AttackConfig)
    cs.store(group="fault", name="base_fault", node=FaultConfig)
    for s in _ADDED:
        cs.store(group=s.name, name=f"base_{s.name}", node=s.schema)


def validate(cfg: Any) -> None:
    """Refuse settings no stage can use, in one line naming the setting, before any work starts: each schema's
    ``validate`` on its section, then the checks that read several sections."""
    _validate_sections(root_schema(), cfg, "")
    root = Checks(cfg, "")
    root.within(0, 2**32 - 1, "seed")  # numpy's and torch's seeding range
    root.at_least(1, "torch_threads")
    if cfg.teacher.ppo.n_steps * cfg.env.num_envs < 2:  # PPO's advantages need two steps per rollout
        raise MadistillError(f"teacher.ppo.n_steps * env.num_envs must be at least 2, got "
                             f"{cfg.teacher.ppo.n_steps} * {cfg.env.num_envs}")
    from omegaconf import OmegaConf

    if OmegaConf.select(cfg, "env.target") is not None:
        from madistill.envs.batched import choose_backend
        from madistill.runtime import env_spec

        choose_backend(env_spec(cfg.env), cfg.env.backend)


def _validate_sections(schema: type, node: Any, path: str) -> None:
    """``validate`` of every schema below ``schema`` on its section of ``node`` (at dotted ``path``)."""
    for name, tp in _field_types(schema).items():
        if is_dataclass(tp):
            section, where = node[name], f"{path}{name}"
            if hasattr(tp, "validate"):
                tp.validate(Checks(section, where))
            _validate_sections(tp, section, where + ".")


@functools.cache
def _field_types(schema: type) -> dict[str, Any]:
    """A schema's fields and their resolved types, in declaration order."""
    hints = get_type_hints(schema)
    return {f.name: hints[f.name] for f in fields(schema)}


def check_overrides(overrides: Sequence[str], groups: Collection[str]) -> None:
    """Refuse an override of a setting no schema has, with or without ``+``, naming the closest one.

    Hydra refuses ``teacher.totl_agent_steps=1`` but suggests ``+teacher.totl_agent_steps=1``, which it
    accepts: the misspelt key is added and ignored, and the run starts with the default. Keys below a
    dict-typed setting (``env.kwargs``, ``teacher.group_ppo``, ...) are free; their stages check them.
    ``groups``: the config groups (``env``, ``experiment``, ...), whose ``group=option`` overrides are Hydra's
    to check; flags and overrides without ``=`` are Hydra's too."""
    for override in overrides:
        if override.startswith(("-", "~")) or "=" not in override:
            continue
        written = override.split("=", 1)[0]
        key = written.lstrip("+")
        if "@" in key or "/" in key or key.split(".")[0] == "hydra" or ("." not in key and key in groups):
            continue
        schema: Any = root_schema()
        for depth, part in enumerate(key.split(".")):
            types = _field_types(schema)
            if part not in types:
                raise MadistillError(_unknown_setting(key.split(".")[: depth + 1], list(types), written != key))
            schema = types[part]
            if not is_dataclass(schema):  # below a dict-typed setting any key is legitimate; below a scalar
                break  # Hydra reports the override


def _unknown_setting(path: list[str], siblings: list[str], added: bool) -> str:
    """The one-line error for setting ``path``, whose last part is none of ``siblings`` (``added``: it was
    given with a leading ``+``)."""
    section = ".".join(path[:-1])
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(path[-1], siblings, n=1)
    fix = f"did you mean {prefix}{close[0]}?" if close else f"{section or 'the config'} has {', '.join(siblings)}"
    plus = " (a + adds keys only under dict settings such as env.kwargs)" if added else ""
    return f"unknown setting {'.'.join(path)!r}{plus}: {fix}"


def _description(schema: type, name: str) -> str:
    """The comment on field ``name`` of ``schema`` in its module's source (``""``: the docstring's first paragraph)."""
    return _descriptions(sys.modules[schema.__module__].__file__ or "").get((schema.__name__, name), "")


@functools.cache
def _descriptions(path: str) -> dict[tuple[str, str], str]:
    """(schema class, field) -> the field's comment in the source file ``path``, on one line: the comment after
    the field, else the comment lines right above it. Read once from the source, so the comments stay the only
    text."""
    source = Path(path).read_text()
    lines = source.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    out: dict[tuple[str, str], str] = {}
    for cls in ast.parse(source).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        out[(cls.name, "")] = (ast.get_docstring(cls) or "").split("\n\n")[0].replace("\n", " ")
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            after = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
            above, n = [], stmt.lineno - 1
            while n in comments and lines[n - 1].lstrip().startswith("#"):
                above.insert(0, comments[n])
                n -= 1
            out[(cls.name, stmt.target.id)] = " ".join(after or above)
    return out


def settings(section: str) -> list[tuple[str, str]]:
    """(dotted key, one-line description) of every setting under ``section`` (``"teacher"``, ``"teacher.ppo"``;
    ``""``: the top-level settings outside any section), in declaration order, nested schemas expanded. A choice
    setting's description starts with its values, ``(inline | thread)``."""
    schema = _schema(section)
    prefix = f"{section}." if section else ""
    out: list[tuple[str, str]] = []
    for name, tp in _field_types(schema).items():
        if is_dataclass(tp):
            if section:
                out += settings(prefix + name)
            continue
        text = _description(schema, name)
        choice = next((t for t in (tp, *get_args(tp)) if isinstance(t, type) and issubclass(t, Choice)), None)
        out.append((prefix + name, f"({' | '.join(choice)}) {text}" if choice else text))
    return out


def section_description(section: str) -> str:
    """The first paragraph of the docstring of the schema behind ``section`` (empty where it has none)."""
    return _description(_schema(section), "")


def _schema(section: str) -> Any:
    """The schema class behind a dotted section (``"teacher.ppo"``; ``""``: Config)."""
    schema: Any = root_schema()
    for part in filter(None, section.split(".")):
        schema = _field_types(schema)[part]
    return schema
