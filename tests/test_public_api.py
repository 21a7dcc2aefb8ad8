"""The public API is listed once, in mesh_middleware.__all__, and pinned here."""

import mesh_middleware


def test_public_api_is_pinned() -> None:
    """Growing or shrinking the public API is a deliberate change to this list."""
    assert sorted(mesh_middleware.__all__) == [
        "AuthorizationDecision",
        "CallerIdentity",
        "IdentityError",
        "Mesh",
        "MeshError",
        "MeshMiddleware",
        "MeshWSGIMiddleware",
        "PathError",
        "PolicyError",
        "PolicyIssue",
        "TokenIssuer",
        "UnknownSigningKey",
        "__version__",
        "get_caller",
    ]


def test_every_public_name_exists_and_has_a_docstring() -> None:
    """Each exported name resolves, and the classes and functions say what they are."""
    for name in mesh_middleware.__all__:
        value = getattr(mesh_middleware, name)
        if callable(value):
            assert value.__doc__, name


def test_adapters_are_importable_under_the_package_namespace() -> None:
    """adapters/ at the top level is imported as mesh_middleware.adapters."""
    from mesh_middleware.adapters import asgi, wsgi

    assert asgi.MeshMiddleware is mesh_middleware.MeshMiddleware
    assert wsgi.MeshWSGIMiddleware is mesh_middleware.MeshWSGIMiddleware
