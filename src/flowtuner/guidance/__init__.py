"""Guidance: how cond / uncond predictions combine into one velocity. Methods are registered by name."""

from flowtuner.guidance.cfg import CFG_FUNCTIONS, guided_model, runs_uncond

__all__ = ["CFG_FUNCTIONS", "guided_model", "runs_uncond"]
