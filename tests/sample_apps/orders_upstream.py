"""``gunicorn tests.sample_apps.orders_upstream:app``: the real orders app, minting its tokens.

The gateway's tests call it as their ``orders`` upstream: the app is
:func:`sample_apps.orders.service.create_app` as gunicorn serves it (two forked workers, each
with its own mesh client), around a :class:`~tests.sample_apps.minting.MintingMesh` so that the
strict inventory and payments it calls accept it as ``orders``.
"""

from __future__ import annotations

from sample_apps.orders.service import create_app
from tests.sample_apps.minting import mesh_from_env

app = create_app(mesh_from_env(), forward_chaos=True)
