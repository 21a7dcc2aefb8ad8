"""``gunicorn tests.support.wsgi_app:app``: a Flask app behind MeshWSGIMiddleware."""

from tests.support.apps import make_flask_app

app = make_flask_app()
