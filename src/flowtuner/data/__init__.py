"""Datasets and caches: config, sources, robust image reading, buckets, cache files, the doctor, the
caching runs and the training loader over caches."""
