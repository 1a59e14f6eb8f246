"""Environment layer: build PettingZoo envs from config, group agents, step N copies together."""

from madistill.envs.episodes import EpisodeRecord
from madistill.envs.factory import EnvSpec, make_env
from madistill.envs.groups import AgentGroup, group_agents
from madistill.envs.vector import MultiAgentVecEnv, VecStep

__all__ = ["AgentGroup", "EnvSpec", "EpisodeRecord", "MultiAgentVecEnv", "VecStep", "group_agents", "make_env"]
