"""`flowtuner demo`: the whole user path (dataset check, caching, training, sampling) on CPU in minutes,
with a procedural dataset and a tiny model set of the real architectures built locally."""
