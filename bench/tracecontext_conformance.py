"""Run the W3C trace-context test suite against a real mesh service (prints; not a pytest test).

The suite is W3C's (github.com/w3c/trace-context, directory ``test/``); it is not vendored here.
Check it out, install its one dependency, and point this script at it:

    git clone https://github.com/w3c/trace-context /tmp/trace-context
    .venv/bin/pip install aiohttp
    .venv/bin/python bench/tracecontext_conformance.py /tmp/trace-context/test

The suite sends requests with good and bad ``traceparent``/``tracestate`` headers to the
service's ``POST /test`` (``tests/support/tracecontext_app.py``: ``MeshMiddleware`` in front, and
``mesh.async_client()`` calling back into the suite), then checks the headers of those calls.
It runs at its strictest level, 2. Exit status 0 when every case passes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.servers import free_port, running, uvicorn_argv

POLICY = "service: tracecontext-test\ninbound:\n  authentication: permissive\n"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    suite_dir = Path(sys.argv[1]).resolve()
    if not (suite_dir / "test.py").is_file():
        print(f"{suite_dir}: not the suite's test/ directory (no test.py)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(POLICY)
        port, harness_port = free_port(), free_port()
        with running(
            uvicorn_argv("tests.support.tracecontext_app:app", port),
            port=port,
            env={"MESH_POLICY": str(policy)},
            log_path=Path(tmp) / "service.log",
        ):
            # The suite's own server thread keeps it alive if its setup fails: bound the wait.
            suite = subprocess.run(
                [sys.executable, "test.py", f"http://127.0.0.1:{port}/test"],
                cwd=suite_dir,
                env={
                    **os.environ,
                    "HARNESS_HOST": "127.0.0.1",
                    "HARNESS_PORT": str(harness_port),
                    "HARNESS_TIMEOUT": "5",
                    "STRICT_LEVEL": "2",
                },
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
    report = suite.stdout + suite.stderr
    ran = re.search(r"^Ran (\d+) tests?", report, re.MULTILINE)
    failed = re.findall(r"^(?:FAIL|ERROR): (\S+)", report, re.MULTILINE)
    print(report[-4000:])
    total = int(ran.group(1)) if ran else 0
    print(f"W3C trace-context suite (level 2): {total - len(failed)} of {total} passed")
    return 0 if ran and not failed and suite.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
