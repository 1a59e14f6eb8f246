"""Everything madistill relies on in stable-baselines3 beyond its documented ``learn()`` loop, in one place.

madistill collects the rollouts and runs each PPO update itself, so it sets what ``learn()`` would have set (the
remaining progress the schedules read, the timestep count), reads SB3's logged values and update count, and
samples only the live entries of SB3's rollout buffer (a subclass that builds on the buffer's internals). The
update is :func:`fast_train`, SB3's ``PPO.train()`` rule with less overhead per minibatch, or ``PPO.train()``
itself where the fast one does not apply.
:func:`check_model` verifies every private attribute used here on a model, and :func:`check_buffer` the buffer
internals, so an SB3 release that changed one fails with a one-line error naming the installed version
(tests/test_sb3_adapter.py also checks that each one still means what this module assumes).
"""

from __future__ import annotations

import functools
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import stable_baselines3
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.distributions import CategoricalDistribution, DiagGaussianDistribution
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import RolloutBufferSamples, Schedule
from stable_baselines3.common.utils import ConstantSchedule, explained_variance
from stable_baselines3.common.vec_env import VecEnv
from torch.distributions import Distribution

from madistill import ppo_losses
from madistill.errors import MadistillError

SB3_VERSION = stable_baselines3.__version__
TESTED_VERSION = "2.9.2"  # the release these internals were checked against
# names of the actor's parameters in SB3's ActorCriticPolicy: its MLP, its action head and (Box) its log-std
ACTOR_PREFIXES = ("mlp_extractor.policy_net.", "action_net.", "log_std")
_MODEL_ATTRIBUTES = ("_current_progress_remaining", "_n_updates", "num_timesteps", "ent_coef", "batch_size",
                     "max_grad_norm", "rollout_buffer", "_update_learning_rate", "normalize_advantage")
# the buffer arrays PPO's minibatches are sampled from, in RolloutBufferSamples' order
_SAMPLED = ("observations", "actions", "values", "log_probs", "advantages", "returns")
_BUFFER_ATTRIBUTES = ("generator_ready", "swap_and_flatten", "device", "observations", "actions", "values",
                      "log_probs", "advantages", "returns", "full", "pos", "buffer_size", "n_envs")


def _changed(what: str) -> MadistillError:
    return MadistillError(f"stable-baselines3 {SB3_VERSION} changed {what}, which madistill relies on (checked with "
                          f"{TESTED_VERSION}): install stable-baselines3=={TESTED_VERSION}")


def quiet(model: PPO) -> PPO:
    """Give ``model`` a logger that keeps its values in memory and writes nothing.

    Without one, every ``learn()`` at ``verbose=0`` configures SB3's default logger, which creates an empty
    ``SB3-<time>`` folder in the system's temporary directory."""
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def check_model(model: PPO) -> None:
    """Refuse an SB3 whose PPO lacks an attribute this module reads or sets."""
    for name in _MODEL_ATTRIBUTES:
        if not hasattr(model, name):
            raise _changed(f"PPO (no attribute {name})")
    if not isinstance(getattr(model.logger, "name_to_value", None), dict):
        raise _changed("its Logger (no name_to_value dict)")
    check_buffer(model.rollout_buffer)


def check_buffer(buffer: RolloutBuffer) -> None:
    """Refuse an SB3 whose rollout buffer lacks an internal :class:`MaskedRolloutBuffer` builds on."""
    for name in _BUFFER_ATTRIBUTES:
        if not hasattr(buffer, name):
            raise _changed(f"RolloutBuffer (no attribute {name})")


class SpacesOnlyVecEnv(VecEnv):
    """Tells SB3's PPO the spaces and batch width to size its buffers for; madistill steps the real envs."""

    def __init__(self, num_envs: int, observation_space: spaces.Space, action_space: spaces.Space):
        super().__init__(num_envs, observation_space, action_space)

    def _unused(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("madistill collects rollouts itself; this placeholder env is never stepped")

    reset = step_async = step_wait = set_attr = env_method = _unused

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [None] * self.num_envs  # VecEnv.__init__ asks for render_mode

    def env_is_wrapped(self, wrapper_class: Any, indices: Any = None) -> list[bool]:
        return [False] * self.num_envs

    def close(self) -> None:
        pass


class MaskedRolloutBuffer(RolloutBuffer):
    """SB3's rollout buffer that samples only the entries where the agent was alive.

    Agents that terminated early (or are absent) still occupy a slot; their absorbing padding steps are
    stored but never reach PPO's losses.
    """

    rng: np.random.Generator | None = None  # minibatch order (None: numpy's global stream, as SB3's own buffer)

    def reset(self) -> None:
        super().reset()
        self.valid = np.zeros((self.buffer_size, self.n_envs), dtype=bool)

    def prepare(self) -> None:
        """Flatten the filled rollout for an update (once; SB3's ``get`` does it on its first call).

        Every sampled field goes into one float32 matrix, side by side in RolloutBufferSamples' order (``widths``
        columns each), so a minibatch is one row gather instead of six copies from numpy. Observations are float32
        (``sb3_observation_space``) and actions become float32 as SB3's minibatches have them (Discrete ones are
        stored as integers). The numpy arrays stay, as SB3's ``train()`` and :meth:`live_observations` read them."""
        assert self.full, "collect a full rollout before training"
        if self.generator_ready:
            return
        for name in _SAMPLED:
            self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])
        columns = [self.__dict__[name].reshape(self.buffer_size * self.n_envs, -1).astype(np.float32, copy=False)
                   for name in _SAMPLED]
        self.widths = [c.shape[1] for c in columns]
        self.packed = torch.as_tensor(np.concatenate(columns, axis=1), device=self.device)
        self.valid_idx = np.flatnonzero(self.swap_and_flatten(self.valid).ravel())
        self.generator_ready = True

    def permutation(self) -> np.ndarray:
        """The live rows in an epoch's minibatch order, drawn as SB3's buffer draws it (from ``rng`` if set)."""
        return (self.rng or np.random).permutation(self.valid_idx)

    def get(self, batch_size: int | None = None):  # type: ignore[override]
        self.prepare()
        indices = self.permutation()
        batch_size = batch_size or len(indices)
        for start in range(0, len(indices), batch_size):
            yield self._get_samples(indices[start : start + batch_size])

    def _get_samples(self, batch_inds: np.ndarray, env: Any = None) -> RolloutBufferSamples:
        """SB3's minibatch (the same values, dtypes and shapes) gathered from the packed rollout."""
        return self.samples(torch.as_tensor(batch_inds, device=self.device))

    def samples(self, rows: torch.Tensor) -> RolloutBufferSamples:
        """The minibatch of the flattened rollout's ``rows`` (a tensor of indices), from one gather. Each field is
        made contiguous, as SB3's own minibatches are: a reduction over a strided column (the advantages' mean and
        std) can add its floats in another order, and then training no longer saves the weights SB3's buffer gives."""
        obs, actions, *flat = self.packed.index_select(0, rows).split(self.widths, dim=1)
        return RolloutBufferSamples(obs.contiguous(), actions.contiguous(), *(t.flatten().contiguous() for t in flat))

    def live_observations(self, n: int, rng: np.random.Generator, width: int, device: torch.device | str) -> torch.Tensor:
        """``n`` (at most all) distinct live observations drawn by ``rng``, their first ``width`` features, from
        the flattened buffer of an update in progress."""
        rows = rng.choice(self.valid_idx, size=min(int(n), len(self.valid_idx)), replace=False)
        return torch.as_tensor(self.observations[rows, :width], device=device)


StepHook = Callable[[], None]  # runs before each optimiser step, after the gradient is computed and clipped


class ScheduledEntropyPPO(PPO):
    """SB3's PPO whose entropy coefficient may be a schedule of the remaining progress, as SB3 already allows
    for the learning rate and the clip range (``teacher.anneal``), and whose update is :func:`fast_train` (SB3's
    learning rule with less overhead per minibatch) where it supports the model (``fast_update``), else SB3's
    ``train()``. ``step_hooks`` run before every optimiser step of either."""

    def __init__(self, *args: Any, ent_coef: float | Schedule = 0.0, fast_update: bool = True,
                 critic_thread: bool = True, **kwargs: Any):
        self.ent_coef_schedule = ent_coef if callable(ent_coef) else ConstantSchedule(float(ent_coef))
        self.fast_update = fast_update
        self.critic_thread = critic_thread
        self.step_hooks: list[StepHook] = []
        super().__init__(*args, ent_coef=self.ent_coef_schedule(1.0), **kwargs)

    def _setup_model(self) -> None:
        super()._setup_model()  # builds the policy and its optimiser (in __init__, and in SB3's load())
        self.policy.optimizer.register_step_pre_hook(lambda *_: self.run_step_hooks())

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "step_hooks"]  # closures over a trainer's state, not settings

    def run_step_hooks(self) -> None:
        """Run ``step_hooks`` in order (the optimiser's pre-step hook in SB3's update; :func:`fast_train` calls it)."""
        for hook in self.step_hooks:
            hook()

    def train(self) -> None:
        self.ent_coef = float(self.ent_coef_schedule(self._current_progress_remaining))
        self.logger.record("train/ent_coef", self.ent_coef)
        if self.fast_update and fast_update_unsupported(self) is None:
            fast_train(self)
            return
        # SB3 builds a torch distribution per minibatch, each checking its logits and actions; they come from this
        # model and its own buffer, so the checks only cost time (experiments/bench_update_modes.py --update).
        # torch keeps the switch process-wide, so while an update runs in the background thread other threads'
        # distributions built with the default skip their checks too; madistill's own policies set theirs
        # explicitly (validate_args=False), so the collector acts the same either way.
        validate = Distribution._validate_args
        Distribution.set_default_validate_args(False)
        try:
            super().train()
        finally:
            Distribution.set_default_validate_args(validate)


def fast_update_unsupported(model: PPO) -> str | None:
    """Why :func:`fast_train` cannot run ``model``'s update (SB3's ``train()`` runs it then), or None: it takes
    Discrete (categorical) and Box (diagonal Gaussian, without gSDE or squashing) actions, one torch Adam group
    over all the policy's parameters without weight decay, amsgrad, maximize or fused/capturable kernels, and
    the masked rollout buffer."""
    policy, optimizer = model.policy, model.policy.optimizer
    if type(policy.action_dist) not in (CategoricalDistribution, DiagGaussianDistribution):
        return f"its action distribution is SB3's {type(policy.action_dist).__name__}"
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return "its optimiser is not one torch Adam parameter group"
    group = optimizer.param_groups[0]
    if any(group.get(k) for k in ("weight_decay", "amsgrad", "maximize", "capturable", "differentiable", "fused")):
        return "its Adam has weight decay, amsgrad, maximize, or capturable, differentiable or fused kernels"
    if [id(p) for p in group["params"]] != [id(p) for p in policy.parameters()]:
        return "its optimiser does not hold exactly the policy's parameters"
    if len({float(optimizer.state[p]["step"]) if p in optimizer.state else 0.0 for p in group["params"]}) > 1:
        return "its parameters are at different Adam steps"
    if not isinstance(model.rollout_buffer, MaskedRolloutBuffer):
        return "its rollout buffer is not madistill's MaskedRolloutBuffer"
    return None


_ALIGN = 16  # float32 elements in 64 bytes, the alignment of torch's CPU allocations


class _FlatAdam:
    """torch's Adam over a policy's parameters, one group without weight decay, with its foreach arithmetic (the same
    operations on the same floats), while the parameters live as views of one flat tensor and their gradients as
    views of another: each of Adam's lines, zeroing the gradients and scaling them to a norm are one operation
    instead of one per parameter. :meth:`close` gives each parameter its own storage back and writes the moments
    and step count into the optimiser's state, where checkpoints and SB3's own update read them."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.group = optimizer.param_groups[0]
        self.params: list[torch.nn.Parameter] = list(self.group["params"])
        state = [optimizer.state.get(p, {}) for p in self.params]
        self.steps = float(state[0]["step"]) if state[0] else 0.0
        # Each parameter starts on a 64-byte boundary, as a tensor of its own does: kernels that pick their code
        # path by alignment (convolutions) then compute the same floats as on SB3's separate tensors.
        self.offsets = list(itertools.accumulate((-(-p.numel() // _ALIGN) * _ALIGN for p in self.params), initial=0))
        template = self.params[0].detach()

        def flat(tensors: Any) -> torch.Tensor:
            out = template.new_zeros(self.offsets[-1])
            for view, t in zip(self._views(out), tensors):
                view.copy_(t.detach())
            return out

        self.flat = flat(self.params)
        self.grad = torch.zeros_like(self.flat)
        self.exp_avg, self.exp_avg_sq = (flat(s.get(k, torch.zeros_like(p)) for s, p in zip(state, self.params))
                                         for k in ("exp_avg", "exp_avg_sq"))
        self.grads = self._views(self.grad)
        for p, view, grad in zip(self.params, self._views(self.flat), self.grads):
            p.data, p.grad = view, grad  # autograd accumulates into an existing .grad in place

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[o : o + p.numel()].view(p.shape) for o, p in zip(self.offsets, self.params)]

    def zero_grad(self) -> None:
        self.grad.zero_()

    def clip_grad_norm(self, max_norm: float) -> None:
        """``torch.nn.utils.clip_grad_norm_``: the norm of the parameters' gradient norms (its own per-tensor
        operation, for the same floats) scales the flat gradient, at most to 1."""
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(self.grads)))
        self.grad.mul_(torch.clamp(max_norm / (total + 1e-6), max=1.0))

    def step(self) -> None:
        beta1, beta2 = self.group["betas"]
        self.steps += 1
        self.exp_avg.lerp_(self.grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(self.grad, self.grad, value=1 - beta2)
        denom = self.exp_avg_sq.sqrt().div_((1 - beta2**self.steps) ** 0.5).add_(self.group["eps"])
        self.flat.addcdiv_(self.exp_avg, denom, value=(self.group["lr"] / (1 - beta1**self.steps)) * -1)

    def close(self) -> None:
        moments = zip(self._views(self.flat), self._views(self.exp_avg), self._views(self.exp_avg_sq))
        for p, (value, exp_avg, exp_avg_sq) in zip(self.params, moments):
            p.data, p.grad = value.clone(), None
            self.optimizer.state[p] = {"step": torch.tensor(self.steps, dtype=torch.float32),
                                       "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}


def _parameter_free_features(policy: ActorCriticPolicy) -> bool:
    """Whether the policy's features extractors have no trainable parameters (SB3's flattening of an MLP policy's
    observations; not a CNN encoder): then no parameter feeds both heads, so each head's gradient can be computed
    apart from the other's to the same floats, and a minibatch's features stay the same through an optimiser step."""
    extractors = (policy.features_extractor, policy.pi_features_extractor, policy.vf_features_extractor)
    return not any(p.requires_grad for m in extractors for p in m.parameters())


class _CriticThread:
    """A second thread for :func:`fast_train`: it runs the critic's forward and backward pass of a minibatch while
    the calling thread runs the actor's. torch releases the GIL inside its operations, so the two passes use two
    cores; their parameters are disjoint, so each gradient is the float the joint backward pass computes. Its job
    is one compiled call (:func:`_compiled_passes`), which holds the GIL only to start."""

    def __init__(self, job: Callable[..., torch.Tensor]) -> None:
        self._job = job
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = False
        self._thread = threading.Thread(target=self._serve, args=(torch.get_num_threads(),), daemon=True,
                                        name="madistill-critic")
        self._thread.start()

    def _serve(self, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        with torch.jit.optimized_execution(False):  # as in fast_train (a setting of each thread)
            while (job := self._jobs.get()) is not None:
                try:
                    self._results.put((job(), None))
                except BaseException as e:  # raised again in the calling thread by result()
                    self._results.put((None, e))

    def submit(self, *args: Any) -> None:
        """Start the job on ``args``."""
        self._pending = True
        self._jobs.put(functools.partial(self._job, *args))

    def result(self) -> torch.Tensor:
        """The running job's return value, once it finished (its exception, raised here)."""
        self._pending = False
        value, error = self._results.get()
        if error is not None:
            raise error
        return value

    def close(self) -> None:
        """Wait for a job still running (the parameters' storage must not move under it), then end the thread."""
        if self._pending:
            self._pending = False
            self._results.get()
        self._jobs.put(None)
        self._thread.join()


class _Minibatch(NamedTuple):
    """A minibatch of the rollout, its features and its advantages, normalised as SB3 normalises them."""

    data: RolloutBufferSamples
    features: Any
    advantages: torch.Tensor


def _minibatch(model: ScheduledEntropyPPO, rows: torch.Tensor) -> _Minibatch:
    """The minibatch of the rollout's ``rows`` (a tensor of indices)."""
    data = model.rollout_buffer.samples(rows)
    return _Minibatch(data, model.policy.extract_features(data.observations),
                      ppo_losses.normalized_advantages(data.advantages, model.normalize_advantage))


def _log_std(policy: ActorCriticPolicy) -> torch.Tensor | None:
    """The Gaussian's log standard deviations of a Box-action policy; None for a categorical one."""
    return None if isinstance(policy.action_dist, CategoricalDistribution) else policy.log_std


def _eager_losses(model: ScheduledEntropyPPO, batch: _Minibatch, clip_range: float,
                  clip_range_vf: float | None) -> tuple[torch.Tensor, ...]:
    """The actor's :func:`~madistill.ppo_losses.actor_losses` and the value loss of a minibatch, computed from
    Python through the policy's modules (for policies whose heads share a CNN encoder)."""
    policy, data = model.policy, batch.data
    out = policy.action_net(policy.mlp_extractor.forward_actor(
        batch.features if policy.share_features_extractor else batch.features[0]))
    values = policy.value_net(policy.mlp_extractor.forward_critic(
        batch.features if policy.share_features_extractor else batch.features[1])).flatten()
    return (*ppo_losses.actor_losses(out, _log_std(policy), data.actions, data.old_log_prob, batch.advantages, clip_range,
                                     model.ent_coef, model.target_kl),
            ppo_losses.value_loss(values, data.old_values, data.returns, clip_range_vf))


def _compiled_passes(model: ScheduledEntropyPPO, clip_range: float,
                     clip_range_vf: float | None) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """The actor's and the critic's forward and backward pass of a :class:`_Minibatch`, each one compiled call
    (:mod:`madistill.ppo_losses`); None where a head is not a plain MLP or the features come from an encoder with
    weights (:func:`_parameter_free_features`). The actor's pass returns what
    :func:`~madistill.ppo_losses.mlp_actor_backward` returns; the critic's pass returns the value loss and, made
    after the pass, the :class:`_Minibatch` of the ``following`` rows (or None)."""
    policy = model.policy
    actor = ppo_losses.mlp_layers([*policy.mlp_extractor.policy_net, policy.action_net])
    critic = ppo_losses.mlp_layers([*policy.mlp_extractor.value_net, policy.value_net])
    if actor is None or critic is None or not _parameter_free_features(policy):
        return None
    actor_pass, critic_pass = ppo_losses.compiled("mlp_actor_backward"), ppo_losses.compiled("mlp_value_backward")
    log_std = _log_std(policy)
    # a centralised critic's actor (madistill.policies.sb3._SplitMlp) reads the agent's own observation first
    actor_dim = getattr(policy.mlp_extractor, "actor_dim", None)
    shared = policy.share_features_extractor
    settings = (clip_range, model.ent_coef, model.target_kl)

    def act(batch: _Minibatch) -> Any:
        x = batch.features if shared else batch.features[0]
        return actor_pass(x if actor_dim is None else x[..., :actor_dim], *actor, log_std, batch.data.actions,
                          batch.data.old_log_prob, batch.advantages, *settings)

    def criticize(batch: _Minibatch, following: torch.Tensor | None) -> tuple[torch.Tensor, _Minibatch | None]:
        loss = critic_pass(batch.features if shared else batch.features[1], *critic, batch.data.old_values,
                           batch.data.returns, clip_range_vf, model.vf_coef)
        return loss, None if following is None else _minibatch(model, following)

    return act, criticize


def fast_train(model: ScheduledEntropyPPO) -> None:
    """One PPO update with SB3's learning rule (``PPO.train()``: the same minibatches in the same order,
    advantage normalisation, clipped surrogate, clip_range_vf, entropy and value coefficients, target_kl early
    stop, gradient clipping, Adam, schedules and logged values) without its per-minibatch overhead: one row gather
    per minibatch from the packed rollout, no distribution objects, the losses logged from tensors read once per
    update, Adam and the gradient clip on flat tensors (:class:`_FlatAdam`), and where both heads are plain MLPs
    each head's pass as one compiled call (:func:`_compiled_passes`). With ``critic_thread`` the critic's pass
    then runs in a second thread beside the actor's (:class:`_CriticThread`), to the same floats. The model must
    pass :func:`fast_update_unsupported`."""
    policy, buffer = model.policy, model.rollout_buffer
    policy.set_training_mode(True)
    model._update_learning_rate(policy.optimizer)
    clip_range = model.clip_range(model._current_progress_remaining)
    clip_range_vf = None if model.clip_range_vf is None else model.clip_range_vf(model._current_progress_remaining)
    buffer.prepare()
    logged: dict[str, list[torch.Tensor]] = {"entropy_loss": [], "policy_gradient_loss": [], "value_loss": [],
                                             "clip_fraction": []}
    adam = _FlatAdam(policy.optimizer)
    passes = _compiled_passes(model, clip_range, clip_range_vf)
    critic = _CriticThread(passes[1]) if passes is not None and model.critic_thread else None
    # TorchScript's optimiser would differentiate the compiled passes by its own derivative formulas, to other
    # gradients than autograd's; unoptimised, autograd records the passes' operations as it records the modules'
    try:
        with torch.jit.optimized_execution(False):
            for _ in range(model.n_epochs):
                log_ratios: list[torch.Tensor] = []
                dists: list[torch.Tensor] = []
                stop = False
                batches = torch.as_tensor(buffer.permutation(), device=buffer.device).split(model.batch_size)
                batch: _Minibatch | None = None
                for i, rows in enumerate(batches):
                    following = batches[i + 1] if i + 1 < len(batches) else None
                    if batch is None:  # an epoch's first; on the modules' path each, after the encoder's last step
                        batch = _minibatch(model, rows)
                    adam.zero_grad()
                    if passes is None:  # SB3's joint loss, back-propagated at once (an encoder feeds both heads)
                        actor_loss, policy_loss, log_ratio, dist, stop, value_loss = _eager_losses(
                            model, batch, clip_range, clip_range_vf)
                        if not stop:
                            (actor_loss + model.vf_coef * value_loss).backward()
                        next_batch = None
                    else:
                        # SB3's loss is actor_loss + vf_coef * value_loss, and with separate heads each term's
                        # gradient reaches its own parameters: each is back-propagated on its own, the critic's in
                        # the second thread while this one runs the actor's, to the same floats (a minibatch that
                        # stops the update is never stepped on, so its critic gradient is dropped); that thread
                        # then makes the following minibatch (its rows, features and advantages, which no
                        # optimiser step changes)
                        if critic is not None:
                            critic.submit(batch, following)
                        actor_loss, policy_loss, log_ratio, dist, stop = passes[0](batch)
                        value_loss, next_batch = (critic.result() if critic is not None
                                                  else passes[1](batch, following))
                    log_ratios.append(log_ratio)
                    dists.append(dist)
                    logged["policy_gradient_loss"].append(policy_loss.detach())
                    logged["value_loss"].append(value_loss.detach())
                    if stop:  # SB3 logs the losses of the minibatch it stops at, and steps on none of it
                        break
                    adam.clip_grad_norm(model.max_grad_norm)
                    model.run_step_hooks()
                    adam.step()
                    batch = next_batch
                approx_kl, clip_fraction, entropy_loss = ppo_losses.logged_stats(
                    log_ratios, dists, _log_std(policy) is not None, clip_range,
                    model.batch_size)
                logged["clip_fraction"].append(clip_fraction)
                logged["entropy_loss"].append(entropy_loss)
                model._n_updates += 1
                if stop:
                    break
    finally:
        if critic is not None:
            critic.close()
        adam.close()
    # SB3 logs the mean of each minibatch's value read as a Python float, approx_kl's of the last epoch as float32,
    # and the last minibatch's loss
    for key, values in logged.items():
        model.logger.record(f"train/{key}", np.mean(torch.cat([v.reshape(-1) for v in values]).tolist()))
    model.logger.record("train/approx_kl", np.mean(approx_kl.cpu().numpy()))
    model.logger.record("train/loss", (actor_loss.detach() + model.vf_coef * value_loss.detach()).item())
    model.logger.record("train/explained_variance",
                        explained_variance(buffer.values.flatten(), buffer.returns.flatten()))
    if hasattr(policy, "log_std"):
        model.logger.record("train/std", torch.exp(policy.log_std).mean().item())
    model.logger.record("train/n_updates", model._n_updates, exclude="tensorboard")
    model.logger.record("train/clip_range", clip_range)
    if clip_range_vf is not None:
        model.logger.record("train/clip_range_vf", clip_range_vf)


def set_progress(model: PPO, agent_steps: int, total: int) -> None:
    """What ``learn()`` sets before an update at ``agent_steps`` of ``total``: the timestep count and the
    remaining progress the learning-rate, clip-range and entropy schedules read."""
    model.num_timesteps = agent_steps
    model._current_progress_remaining = max(0.0, 1.0 - agent_steps / total)


def progress_done(model: PPO) -> float:
    """The share of training done at the model's current (or last) update."""
    return 1.0 - float(model._current_progress_remaining)


def update_count(model: PPO) -> int:
    """SB3's update count (epochs trained so far), which checkpoints keep."""
    return int(model._n_updates)


def set_update_count(model: PPO, n: int) -> None:
    """Restore the count :func:`update_count` read (a resumed run continues it)."""
    model._n_updates = int(n)


def take_logged(model: PPO, step: int) -> dict[str, float]:
    """The values SB3 logged since the last call (its losses and what hooks recorded), then cleared."""
    values = dict(model.logger.name_to_value)
    model.logger.dump(step)  # clears the values; madistill's models log to no outputs
    return values


def actor_parameters(policy: ActorCriticPolicy) -> list[torch.nn.Parameter]:
    """The actor's parameters of an SB3 actor-critic (not the critic's), in the policy's order."""
    return [p for n, p in policy.named_parameters() if n.startswith(ACTOR_PREFIXES)]


def actor_linears(policy: ActorCriticPolicy) -> list[torch.nn.Linear]:
    """The actor's linear layers of an SB3 actor-critic, input to output: its MLP's, then its action head."""
    return [m for m in policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)] + [policy.action_net]
