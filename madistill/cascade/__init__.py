"""The cascade monitor: inject a fault into one agent and measure how it propagates through the others."""
