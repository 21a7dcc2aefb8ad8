"""The inbound engine behind both middlewares: path, identity, authorization, faults."""
