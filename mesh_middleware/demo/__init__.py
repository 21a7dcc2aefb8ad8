"""``mesh demo``: the sample shop with the mesh inside each app, a registry, and traffic.

The demo needs a source checkout (it runs ``sample_apps/``) and the test extras (FastAPI,
Flask, gunicorn). It checks the shop's policy files, starts the registry (dev mode, its store
in a temporary directory) and every app as real processes (:mod:`.shop`), waits until each is
healthy and registered, sends a bounded mix of requests to the gateway (:mod:`.traffic`),
shows a live table per edge from the registry's telemetry and the apps' metrics pages
(:mod:`.board`, :mod:`.scrape`), and ends with a summary that checks what the shop promises
(:mod:`.summary`). Ctrl-C or SIGTERM at any point stops every process it started and removes
the temporary directory.

Modules: ``shop`` (the processes; ``Shop`` is reused by the end-to-end tests), ``traffic``,
``scrape``, ``board``, ``summary``, ``preflight``, ``run`` (the sequence), ``_processes`` and
``_interrupts`` (operating-system plumbing).
"""

from __future__ import annotations

from mesh_middleware.demo.run import run_demo

__all__ = ["run_demo"]
