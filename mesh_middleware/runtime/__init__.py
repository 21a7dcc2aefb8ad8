"""The per-process Mesh runtime and the background work it owns."""
