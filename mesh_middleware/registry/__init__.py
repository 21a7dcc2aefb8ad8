"""The registry service (`mesh registry`): catalog, leases, watches, identity issuer.

Apps never import this package; it shares only the wire contract and small pure modules
(identity token format, SPIFFE IDs, durations) with the data plane.
"""
