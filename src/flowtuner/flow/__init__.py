"""Flow-matching math, model-agnostic and pure: conventions, sigma schedules, samplers."""
