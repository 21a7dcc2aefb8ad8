"""The public API is listed once, in mesh_middleware.__all__, and pinned here."""

import mesh_middleware


def test_public_api_is_pinned() -> None:
    """Growing or shrinking the public API is a deliberate change to this list."""
    assert sorted(mesh_middleware.__all__) == [
        "AsyncMeshTransport",
        "AuthorizationDecision",
        "CallerIdentity",
        "CircuitOpen",
        "Deadline",
        "DeadlineExceeded",
        "EndUser",
        "IdentityError",
        "Mesh",
        "MeshError",
        "MeshMiddleware",
        "MeshTransport",
        "MeshWSGIMiddleware",
        "NoHealthyInstances",
        "PathError",
        "PolicyError",
        "PolicyIssue",
        "RetryBudgetExhausted",
        "TokenIssuer",
        "UnknownSigningKey",
        "__version__",
        "get_caller",
        "get_deadline",
        "get_user",
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


def test_mesh_errors_are_the_httpx_errors_they_stand_for() -> None:
    """Existing ``except httpx.…`` code keeps catching what the mesh raises."""
    import httpx

    assert issubclass(mesh_middleware.NoHealthyInstances, httpx.ConnectError)
    assert issubclass(mesh_middleware.CircuitOpen, httpx.HTTPStatusError)
    assert issubclass(mesh_middleware.RetryBudgetExhausted, httpx.TransportError)
    assert issubclass(mesh_middleware.DeadlineExceeded, httpx.TimeoutException)
    for error in (
        mesh_middleware.NoHealthyInstances,
        mesh_middleware.CircuitOpen,
        mesh_middleware.RetryBudgetExhausted,
        mesh_middleware.DeadlineExceeded,
    ):
        assert issubclass(error, mesh_middleware.MeshError)
        assert issubclass(error, httpx.HTTPError)
