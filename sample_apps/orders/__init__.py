"""orders: a Flask service under gunicorn, permissive identity, authorization in audit mode."""
