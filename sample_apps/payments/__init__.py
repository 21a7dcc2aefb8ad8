"""payments: charges orders, a FastAPI service under uvicorn (strict mesh identity)."""
