"""orders: places orders, a Flask service under gunicorn with two workers (strict identity)."""
