"""AEC envs driven as parallel envs: one full agent cycle per parallel step.

Same contract and results as PettingZoo's ``aec_to_parallel`` (tests compare them step for step), at
about two thirds of its cost on mpe2: PettingZoo's conversion computes every agent's observation twice per
step (once through ``last()``, whose result it drops) and reads the env's state dicts through the wrapper
chain's ``__getattr__`` once per agent pair. Here each observation is computed once, the state dicts
are read from the innermost env when every wrapper in between only checks or clips actions, and actions
skip wrappers that only check them.
"""

from __future__ import annotations

from typing import Any

from pettingzoo import AECEnv, ParallelEnv
from pettingzoo.utils.wrappers import (
    AssertOutOfBoundsWrapper,
    BaseWrapper,
    CaptureStdoutWrapper,
    ClipOutOfBoundsWrapper,
    OrderEnforcingWrapper,
)

# Wrappers that keep no state dicts of their own: reading ``agents``, ``rewards``, ... past them is exact.
_FORWARDING_WRAPPERS = (OrderEnforcingWrapper, AssertOutOfBoundsWrapper, ClipOutOfBoundsWrapper, CaptureStdoutWrapper)
# Wrappers whose step and observe only check the call (reset first, action in its space) and change
# nothing. The cycle below keeps the order itself; the vector env checks every action's shape and type,
# and Discrete actions' range, before they get here (MultiAgentVecEnv.step), and rollouts clip Box actions
# to their bounds; so these checks would cost about a tenth of an mpe2 step for nothing. Clipping changes
# actions, so it is not among them.
_CHECKING_WRAPPERS = (OrderEnforcingWrapper, AssertOutOfBoundsWrapper, CaptureStdoutWrapper)


def _innermost(env: AECEnv, past: tuple[type, ...]) -> AECEnv:
    """The innermost env if every wrapper around it is one of ``past``, else ``env`` itself."""
    inner = env
    while isinstance(inner, BaseWrapper):
        if type(inner) not in past:
            return env
        inner = inner.env
    return inner


class AECCycleParallelEnv(ParallelEnv):
    """A parallelizable AEC env (``metadata["is_parallelizable"]``) as a PettingZoo ParallelEnv.

    Actions go through the wrapper chain's clipping but not through wrappers that only check them (reset
    and render go through the whole chain); a step's reward for an agent is the sum of its rewards over the
    cycle, as in PettingZoo's conversion.
    """

    def __init__(self, aec_env: AECEnv):
        if not aec_env.metadata.get("is_parallelizable", False):
            raise AssertionError("the AEC env does not declare metadata['is_parallelizable']")
        self.aec_env = aec_env
        self._state = _innermost(aec_env, _FORWARDING_WRAPPERS)
        self._acting = _innermost(aec_env, _CHECKING_WRAPPERS)
        self.possible_agents = aec_env.possible_agents
        self.metadata = aec_env.metadata
        self.render_mode = getattr(aec_env, "render_mode", None)
        if hasattr(aec_env, "state_space"):
            self.state_space = aec_env.state_space

    def observation_space(self, agent: str) -> Any:
        return self.aec_env.observation_space(agent)

    def action_space(self, agent: str) -> Any:
        return self.aec_env.action_space(agent)

    @property
    def unwrapped(self) -> AECEnv:
        return self.aec_env.unwrapped

    def reset(self, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        self.aec_env.reset(seed=seed, options=options)
        s = self._state
        self.agents = s.agents[:]
        obs = {a: self._acting.observe(a) for a in s.agents if not (s.terminations[a] or s.truncations[a])}
        return obs, dict(**s.infos)

    def step(self, actions: dict[str, Any]) -> tuple[dict, dict, dict, dict, dict]:
        aec, s = self._acting, self._state
        rewards: dict[str, float] = {}
        for agent in s.agents:
            if agent != s.agent_selection:
                raise AssertionError(
                    f"expected agent {agent} to act, got {s.agent_selection}: a parallel step needs every agent to "
                    "act once per cycle, with agents leaving only at the end of a cycle"
                )
            aec.step(actions[agent])
            cycle_rewards = s.rewards
            for a in s.agents:
                rewards[a] = rewards.get(a, 0) + cycle_rewards[a]
        terminations, truncations, infos = dict(**s.terminations), dict(**s.truncations), dict(**s.infos)
        obs = {a: aec.observe(a) for a in s.agents}
        while s.agents and (s.terminations[s.agent_selection] or s.truncations[s.agent_selection]):
            aec.step(None)
        self.agents = s.agents
        return obs, rewards, terminations, truncations, infos

    def render(self) -> Any:
        return self.aec_env.render()

    def state(self) -> Any:
        return self.aec_env.state()

    def close(self) -> None:
        self.aec_env.close()
