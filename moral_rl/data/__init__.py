"""Data files shipped with moral_rl (the retention probes)."""
