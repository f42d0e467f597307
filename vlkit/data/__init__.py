"""Datasets: LLaVA JSON loading and the procedural shapes world (``vlkit.data.toy``)."""
