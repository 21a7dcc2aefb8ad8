"""Framework and client adapters, thin views over the Mesh runtime.

Imported as ``mesh_middleware.adapters``: ``asgi`` (FastAPI, Starlette) and ``wsgi`` (Flask).
"""
