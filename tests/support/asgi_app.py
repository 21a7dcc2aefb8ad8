"""``uvicorn tests.support.asgi_app:app``: a FastAPI app behind MeshMiddleware."""

from tests.support.apps import make_fastapi_app

app = make_fastapi_app()
