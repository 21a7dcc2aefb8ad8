"""inventory: a FastAPI service under uvicorn, strict mesh identity."""
