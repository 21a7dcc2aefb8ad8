"""Serving apps with the mesh's mutual TLS: the ``mesh run`` launcher."""
