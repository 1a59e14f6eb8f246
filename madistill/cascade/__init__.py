"""The cascade monitor: fault injection, how failures propagate between agents, and online alerts."""
