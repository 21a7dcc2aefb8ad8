"""inventory: the shop's stock, a FastAPI service under uvicorn (strict mesh identity)."""
