"""Build hook: compiles the request path with mypyc where it can, and leaves it Python otherwise.

Everything else about the package is in pyproject.toml. The modules compiled are
``COMPILED_MODULES`` in ``mesh_middleware/_compiled.py``. Nothing is compiled when
``MESH_MIDDLEWARE_PURE_PYTHON=1`` is set for the install, when mypyc cannot be imported, or when
it fails (no C compiler, say): the install then carries the pure-Python package, which behaves the
same, only slower. A build records the SHA-256 of each source it compiled in
``mesh_middleware/_compiled_sources.py``: at import, a compiled module whose source no longer has
that digest (an editable checkout edited since) makes the package run the source of all of them.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
LISTING = runpy.run_path(str(ROOT / "mesh_middleware" / "_compiled.py"))
SOURCES: dict[str, Path] = LISTING["source_files"](ROOT)

# mypyc type-checks what it compiles. The build runs in an isolated environment without the
# package's dependencies, so their types are unknown (Any) there; the strict settings of
# [tool.mypy] are for the development environment, not for the build.
_MYPYC_OPTIONS = ["--config-file", str(ROOT / "mypyc.ini")]


# The digests of the sources as mypyc read them, taken just before it does: a source edited
# while the (minute-long) build runs is then seen as changed since it was compiled.
_DIGESTS: dict[str, str] = {}


def _write_digests(target: Path) -> None:
    lines = [
        '"""Written by setup.py: the SHA-256 of each source compiled by mypyc in this build."""',
        "",
        "DIGESTS = {",
        *(f"    {name!r}: {digest!r}," for name, digest in _DIGESTS.items()),
        "}",
        "",
    ]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines))


class BuildExtensions(build_ext):
    """Builds the extensions, then records the digests of their sources where the built
    package looks for them: in the wheel, and in the source tree of an editable install.
    (Only here: an sdist, or any other command, must not vouch for extensions it did not build.)
    """

    def run(self) -> None:
        super().run()
        if not self.extensions:
            return
        roots = [Path(self.build_lib)]
        if self.inplace or self.editable_mode:
            roots.append(ROOT)
        for root in roots:
            _write_digests(root / "mesh_middleware" / "_compiled_sources.py")


def compiled_extensions() -> list[Extension]:
    if LISTING["pure_python_wanted"]():
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("setup.py: mypyc is not available; building pure Python", file=sys.stderr)
        return []
    mapped = ROOT / "mesh_middleware" / "adapters"
    if not mapped.exists() and (ROOT / "adapters").is_dir():
        # An sdist leaves out the link through which mypyc names mesh_middleware.adapters.
        mapped.symlink_to(Path("..") / "adapters")
    relative = [str(path.relative_to(ROOT)) for path in SOURCES.values()]
    _DIGESTS.update({name: LISTING["source_digest"](path) for name, path in SOURCES.items()})
    try:
        extensions = mypycify(
            [*_MYPYC_OPTIONS, *relative], opt_level="3", group_name="mesh_middleware"
        )
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error
        print(f"setup.py: mypyc failed ({exc!r}); building pure Python", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # a failed C compile leaves the pure-Python package
    return extensions


setup(ext_modules=compiled_extensions(), cmdclass={"build_ext": BuildExtensions})
