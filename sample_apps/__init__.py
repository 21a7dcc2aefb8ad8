"""Sample apps for ``mesh demo``: small services with the mesh inside them."""
