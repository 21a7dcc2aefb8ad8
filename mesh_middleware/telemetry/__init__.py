"""Metrics and logs of the mesh itself."""
