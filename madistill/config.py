"""Typed config schemas (Hydra ConfigStore). YAML files in ``conf/`` fill them; a wrong key or type fails
at startup with Hydra's validation message instead of deep inside a run."""

from __future__ import annotations

import ast
import difflib
import functools
import io
import sys
import tokenize
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from madistill.errors import MadistillError


@dataclass
class EnvConfig:
    name: str = MISSING  # short id used in run paths and reports, e.g. simple_spread_v3
    target: str = MISSING  # import path of a PettingZoo env factory or module
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the env factory
    num_envs: int = 16  # env copies stepped together
    num_workers: int = 2  # worker processes stepping the copies (0: in this process)
    grouping: str = "auto"  # auto: agents with equal spaces share a policy; per_agent: one each
    nan_policy: str = "error"  # error | zero: what to do with NaN/inf observations
    # auto | batched | pettingzoo: batched steps all copies of an mpe2 env with a numpy port at once
    # (madistill/envs/batched, same numbers as mpe2); auto picks it where a port exists, else pettingzoo
    backend: str = "auto"
    # Named feature groups per agent group for saliency, e.g. {listener: {landmark_0: [2, 3]}}; features
    # left out stay single (named by the env where it names them).
    features: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    lambda_igr: float = 1.0  # the DIGR weight tuned for this env (distill=digr reads it; plain sets 0)
    # Teams (sides) for the reports: team name -> agent ids or agent-name prefixes, every agent in exactly one,
    # e.g. +env.teams={adversaries: [adversary], good: [agent]}. Empty: inferred from the agent names (docs/teams.md).
    teams: dict[str, list[str]] = field(default_factory=dict)


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


@dataclass
class AnnealConfig:
    """Linear annealing of PPO settings over training: each one's value at the end as a fraction of its
    teacher.ppo (or group_ppo) value; None keeps it constant. teacher.anneal.learning_rate=0 is CleanRL's anneal_lr."""

    learning_rate: float | None = None  # end value as a fraction of the start value (null: constant)
    clip_range: float | None = None  # end value as a fraction of the start value (null: constant)
    ent_coef: float | None = None  # end value as a fraction of the start value (null: constant)


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


@dataclass
class TeacherConfig:
    total_agent_steps: int = 1_000_000  # summed over agents and env copies
    hidden_sizes: list[int] = field(default_factory=lambda: [256, 256])  # actor and critic MLP layer widths
    activation: str = "tanh"  # tanh | relu | elu | gelu: the MLPs' activation
    normalize_obs: bool = True  # normalise observations by running mean and std (policies act in these units)
    # Whether an agent cut off by the episode's time limit (truncated, not terminated) gets the critic's value of
    # its final observation as reward: right where the limit only cuts short an endless task or the observation
    # tells the time left. Off, the limit ends the return as a termination does (PettingZoo's
    # SuperSuit recipe for SB3 sees every end so; docs/continuous_actions.md).
    bootstrap_truncated: bool = True
    # "local": each agent's critic sees its own observation (independent PPO); "central": it sees the whole
    # team's observations of its env copy too (centralised training, decentralised execution, as in MAPPO).
    # The actor always sees only its own observation, so saved teachers act alike either way.
    critic: str = "local"
    cnn: CNNConfig = field(default_factory=CNNConfig)  # encoder of image observations, before hidden_sizes
    ppo: PPOConfig = field(default_factory=PPOConfig)
    checkpoint_every: int = 0  # agent steps between checkpoints (0: only at the end and on Ctrl-C)
    resume: str | None = None  # checkpoint directory to continue from
    # When each PPO update runs: "inline" after each rollout (SB3's strictly on-policy schedule), or in a
    # background "thread" overlapped with the next rollout, which is collected with the weights from before
    # that update (one update of policy lag, as in asynchronous PPO; docs/architecture.md, "Teacher update modes").
    update_mode: str = "inline"
    # Per-group PPO settings over teacher.ppo, by group name (heterogeneous groups often need their own), e.g.
    # +teacher.group_ppo.speaker.ent_coef=0.01. n_steps is shared: every group acts in the same rollouts.
    group_ppo: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Reward for actions that say what the agent observes (their pointwise mutual information; madistill/bonus.py),
    # by group name, e.g. +teacher.message_bonus.speaker=0.05: against a speaker that sends one message for two meanings.
    message_bonus: dict[str, float] = field(default_factory=dict)
    anneal: AnnealConfig = field(default_factory=AnnealConfig)


@dataclass
class StudentConfig:
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 64])  # the student MLP's layer widths
    activation: str = "tanh"  # tanh | relu | elu | gelu: the student MLP's activation
    # encoder of image observations, before hidden_sizes: compact (with hidden_sizes=[64, 64], 38k parameters on
    # 36x36x3 images, 1/8 of the default teacher's acting network)
    cnn: CNNConfig = field(default_factory=lambda: CNNConfig(channels=[16, 32], kernels=[8, 4], strides=[4, 2],
                                                             max_grid=4, features_dim=64))


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
    divergence: str = "kl"  # kl | reverse_kl | prob_l2 | logit_mse | nll
    temperature: float = 1.0  # teacher softmax temperature (Box: scales the teacher's variance)
    lambda_igr: float = 1.0  # weight of the selective input-gradient penalty
    mask: str = "threshold"  # soft | topk | threshold: how teacher saliency becomes feature relevance
    topk: int = 3  # groups kept relevant by mask=topk
    threshold: float = 0.2  # saliency at or above which a group is relevant (mask=threshold)
    target: str = "log_prob"  # f_S whose input gradient is regularised: log_prob | logit
    heldout_fraction: float = 0.1  # share of visited observations kept for agreement metrics
    # Robust distillation (adversarial term): PGD on the student within adv_eps (normalised units, features in
    # attack.exclude kept), eps ramped linearly from 0 over the first adv_ramp share of the updates.
    adv_weight: float = 0.0  # weight of divergence(teacher(x) || student(x + delta))
    smooth_weight: float = 0.0  # weight of KL(student(x) || student(x + delta))
    adv_eps: float = 0.3  # radius of the PGD perturbation (normalised units)
    adv_steps: int = 3  # PGD steps of the adversarial term
    adv_objective: str = "kl"  # kl (policy divergence) | ce (flip the greedy action, FGSM's objective) | both (per sample the worse)
    adv_fgsm: bool = False  # per sample, the worse of that PGD's point and FGSM's (one full signed step on ce)
    adv_ramp: float = 0.5  # share of the updates over which adv_eps grows from 0
    adv_collect: float = 0.0  # chance per env copy and step that DAgger collection runs under that PGD


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
    attack_objective: str = "ce"  # what that PGD maximises: ce (flip the greedy action) | kl
    # checkpoint selection: the saved student is the best-scoring of the start and every select_every steps
    select_every: int = 50_000  # agent-steps between validations (0: save the last policy, validate nothing)
    select_episodes: int = 50  # validation episodes per candidate and attack (the same seeds for every candidate)
    select_attacks: list[str] = field(default_factory=lambda: ["fgsm", "pgd"])  # validation attacks (all agents victims, radius eps)
    select_robust_weight: float = 0.5  # score = (1 - w) * clean + w * worst validation team return


@dataclass
class SaliencyConfig:
    baseline: str = "mean"  # perturbation baseline: mean (normaliser mean) | marginal (other observations)
    baseline_samples: int = 4  # draws per observation for the marginal baseline
    target: str = "log_prob"  # what gradient saliency explains: log_prob | logit of the chosen action
    topk: int = 3  # k of the top-k overlap metric
    policy: str | None = None  # saliency stage: run or policy directory
    obs: str | None = None  # saliency stage: .npz of raw observations per group (default: roll out the policy)
    episodes: int = 20  # saliency stage: episodes rolled out when no observations are given
    rows: int = 50  # observations shown in the per-observation heatmap
    # image groups: pixels are grouped into square patches of this side (all channels) for saliency, DIGR and
    # attack.exclude names (patch_<row>_<col>); 1 keeps every flattened pixel value its own feature
    image_patch: int = 6


@dataclass
class AttackConfig:
    """Robustness evaluation (``madistill attack``) and the attack settings robust distillation uses."""

    policy: str | None = None  # run, policy or sweep directory to attack
    # add "learned" for the PPO adversary (trained per victim set and eps: attack.learned_steps each) and
    # "offsets" for the constant-offset search (attack.offset_candidates replays of every episode), and
    # "targeted_random" / "targeted_lowest" for PGD that forces a chosen action (docs/attacks.md)
    methods: list[str] = field(default_factory=lambda: ["random", "fgsm", "pgd", "critic", "spsa", "transfer"])
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
    step_size: float = 2.5  # PGD step = step_size * eps / steps
    spsa_samples: int = 32  # random directions per SPSA gradient estimate
    spsa_delta: float = 0.3  # SPSA finite-difference scale, relative to eps
    critic: str | None = None  # policy whose value heads the critic attack uses (default: the teacher)
    transfer_from: str | None = None  # surrogate for the transfer attack (default: the teacher <-> its student)
    learned_steps: int = 200_000  # env steps of PPO training for each learned adversary
    learned_envs: int = 4  # env copies the learned adversary trains in
    # SB3 PPO arguments of the learned adversary
    learned_ppo: dict[str, Any] = field(default_factory=lambda: {"n_steps": 128, "batch_size": 256,
                                                                 "learning_rate": 3e-4, "ent_coef": 0.0})
    offset_candidates: int = 20  # constant offsets the "offsets" attack replays every episode with
    target_candidates: int = 4  # targeted_lowest (Discrete): lowest-ranked actions tried at once, the lowest reached wins
    episodes: int = 50  # episodes per attack, victim set and eps
    seed: int = 20_000  # episode seeds, disjoint from training and clean-evaluation seeds
    checks: bool = True  # gradient-masking checks (adds strong PGD at the middle eps and a collapse run)
    collapse_eps: float = 3.0  # PGD here on all agents should leave under half the gain over random
    masking_tolerance: float = 0.1  # return differences below this share of the clean gain are not flagged
    probe_observations: int = 512  # observations for the objective-level checks
    probe_tolerance: float = 0.5  # an objective-level flag needs one attack to reach (1 + this) x the other's KL
    n_boot: int = 1000  # bootstrap resamples for the report's CIs and the masking checks


@dataclass
class RepairConfig:
    """Neuron localisation and gradient-masked repair (``madistill repair``, docs/repair.md)."""

    policy: str | None = None  # run or policy directory whose policy is repaired (a run's teacher, else its only policy)
    group: str | None = None  # agent group to repair (default: the Discrete group with the most failures)
    failures: str | None = None  # .npz of raw observations `obs` [N, d] and wanted `actions` [N]; default: built with the attack
    attack: str = "pgd"  # the attack suite member (attack.methods names) that builds the failure set
    eps: float | None = None  # its l_inf radius in stds (default: the middle of attack.eps, the suite's middle budget)
    episodes: int = 20  # clean episodes whose observations are attacked (failure set) and anchor clean behaviour
    max_failures: int = 4096  # failing observations kept at most
    score: str = "grad"  # neuron scores: grad (activation x gradient) | ig (integrated gradients) | probe (sparse probe)
    ig_steps: int = 16  # integrated gradients: points on the path from the ablated to the actual units
    probe_l1: float = 0.001  # sparse probe: L1 penalty on its weights
    probe_steps: int = 300  # sparse probe: Adam steps of its logistic regression
    neurons: float = 0.03  # share of the hidden neurons repaired (at least one)
    max_parameters: float = 0.05  # most of the policy's acting parameters the repair may change (drops lowest-scored neurons)
    ablation_draws: int = 20  # random neuron sets of the same size the chosen neurons' ablation is compared to
    steps: int = 300  # fine-tuning steps (every variant: masked and baselines)
    batch_size: int = 256  # failing and as many clean observations per step
    learning_rate: float = 0.001  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay (masked parameters stay bit-identical regardless)
    anchor: float = 1.0  # weight of the clean anchor: divergence to the original policy on clean observations
    divergence: str = "kl"  # the anchor's divergence (distill.divergence's choices)
    baselines: list[str] = field(default_factory=lambda: ["full", "last", "random"])  # also fine-tuned, same data and steps
    evaluate: bool = True  # clean and attacked returns of the original and every variant (attack.* settings, at eps)


@dataclass
class LoggerConfig:
    tensorboard: bool = True  # TensorBoard event files in the run's tb/
    progress: bool = True  # progress bars with rate and ETA
    figures: bool = True  # PNG figures in reports/ (and images in TensorBoard)


@dataclass
class EvalConfig:
    policy: str | None = None  # run or policy directory (evaluate stage); pipeline fills it
    names: list[str] = field(default_factory=list)  # which policies of a run dir (empty: all)
    episodes: int = 100  # episodes per policy
    seed: int = 10_000  # episode seeds seed..seed+episodes-1, disjoint from training seeds
    deterministic: bool = True  # greedy actions (false: sampled)
    # sampled actions (deterministic=false, the random team) from one stream per episode, so they do not
    # depend on env.num_envs; off by default so far, as the README's sampled numbers came from one shared stream
    episode_streams: bool = False
    random_baseline: bool = True  # also evaluate a uniform-random team for reference
    n_boot: int = 2000  # bootstrap resamples for the 95% CIs
    video: bool = False  # save a GIF of one episode from the env's rgb_array render
    video_format: str = "gif"  # gif | mp4 (mp4 needs imageio[ffmpeg])


@dataclass
class Config:
    env: EnvConfig = MISSING
    teacher: TeacherConfig = MISSING
    logger: LoggerConfig = MISSING
    student: StudentConfig = MISSING
    distill: DistillConfig = MISSING
    finetune: FinetuneConfig = MISSING
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    attack: AttackConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
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
    for s in _ADDED:
        cs.store(group=s.name, name=f"base_{s.name}", node=s.schema)


# Counts that must be positive: a zero or negative value would save an untrained policy or summarise nothing.
POSITIVE = ("teacher.total_agent_steps", "eval.episodes", "attack.episodes", "saliency.episodes", "distill.rounds",
            "distill.agent_steps_per_round", "distill.updates_per_round", "distill.batch_size",
            "finetune.total_agent_steps", "finetune.steps", "repair.episodes", "repair.max_failures", "repair.ig_steps",
            "repair.probe_steps", "repair.ablation_draws", "repair.steps", "repair.batch_size")


def validate(cfg: Any) -> None:
    """Refuse settings no stage can use, in one line naming the key, before any work starts."""
    from omegaconf import OmegaConf

    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if value is not None and value < 1:
            raise MadistillError(f"{key} must be at least 1, got {value}")
    if OmegaConf.select(cfg, "env.target") is not None:
        from madistill.envs.batched import choose_backend
        from madistill.runtime import env_spec

        choose_backend(env_spec(cfg.env), cfg.env.backend)


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
    ``""``: the top-level settings outside any section), in declaration order, nested schemas expanded."""
    schema = _schema(section)
    prefix = f"{section}." if section else ""
    out: list[tuple[str, str]] = []
    for name, tp in _field_types(schema).items():
        if is_dataclass(tp):
            if section:
                out += settings(prefix + name)
        else:
            out.append((prefix + name, _description(schema, name)))
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
