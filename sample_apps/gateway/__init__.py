"""gateway: the shop's public entry, a FastAPI service under uvicorn (permissive identity)."""
