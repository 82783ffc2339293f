"""Every piece of BentoML's and uvicorn's internals this service patches or builds on, checked at import.

The service reaches below the public APIs in a few places, each for a measured reason: BentoML's
``TimeoutMiddleware.__call__`` is replaced (its per-request timer leaked; ``service/bentoml_fixes.py`` and
``docs/upstream/bentoml-timeout-middleware.md``), uvicorn's ``send_400_response`` is replaced (a JSON error
body), uvicorn's httptools protocol is subclassed (``service/fast_http.py``: the prediction routes answered
from the parser's callbacks) and BentoML's metrics client is read from its container (``/metrics``).

A patch written against one version of someone else's code is only right for that code. So the source of
each function we replace or extend is hashed here, and a service started on anything else stops at import
with one line naming what changed, instead of silently running a patch over code it was not written for.
Upgrading BentoML or uvicorn: read the changed functions, adjust the patch, then update ``SOURCES`` with
``python -m service.upstream --print``.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from importlib import metadata

# The versions the patches were written and measured against (pyproject.toml pins them).
VERSIONS = {"bentoml": "1.4.39", "uvicorn": "0.54.0"}

# module:qualified.name -> first 16 hex digits of the SHA-256 of its source (before our patch replaced it).
_HTTPTOOLS = "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol"
SOURCES = {
    "bentoml._internal.server.http.traffic:TimeoutMiddleware.__call__": "fd8b9e3da28ed2b4",
    "bentoml._internal.server.http.traffic:TimeoutMiddleware._set_timer_out": "adfa8eb6f3b2de7d",
    f"{_HTTPTOOLS}.send_400_response": "ae5a4a3782b646fd",
    "uvicorn.protocols.http.h11_impl:H11Protocol.send_400_response": "56937b748fc59d92",
    f"{_HTTPTOOLS}.connection_made": "6efb565ff3d36b91",
    f"{_HTTPTOOLS}.on_message_begin": "96d377fdc7c2baef",
    f"{_HTTPTOOLS}.on_headers_complete": "1ea8589acfad92d8",
    f"{_HTTPTOOLS}.on_body": "dba9c32aeba35b6a",
    f"{_HTTPTOOLS}.on_message_complete": "1fbad42dc31fc01f",
    f"{_HTTPTOOLS}.on_response_complete": "64e254f28e389e76",
}
# What a patch replaced, kept by the patch itself, so the check still reads upstream's code after it.
ORIGINALS: dict[str, object] = {}


class UpstreamChanged(RuntimeError):
    """The code under a patch is not the code the patch was written for."""


def _resolve(target: str) -> object:
    module_name, _, qualname = target.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def source_hash(target: str) -> str:
    code = ORIGINALS.get(target) or _resolve(target)
    return hashlib.sha256(inspect.getsource(code).encode()).hexdigest()[:16]  # type: ignore[arg-type]


def problems(sources: dict[str, str] | None = None) -> list[str]:
    """What differs from the code the patches were written for (empty when nothing does)."""
    found = []
    for package, wanted in VERSIONS.items():
        installed = metadata.version(package)
        if installed != wanted:
            found.append(f"{package} {installed} is installed, the patches were written for {wanted}")
    for target, wanted in (SOURCES if sources is None else sources).items():
        try:
            got = source_hash(target)
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            found.append(f"{target} is gone ({type(exc).__name__})")
            continue
        if got != wanted:
            found.append(f"{target} changed (source hash {got}, the patch was written for {wanted})")
    return found


def check() -> None:
    """Raise :class:`UpstreamChanged` with one line naming the first difference."""
    found = problems()
    if found:
        more = f" (and {len(found) - 1} more: python -m service.upstream)" if len(found) > 1 else ""
        raise UpstreamChanged(f"{found[0]}{more}: re-check the patches (service/upstream.py) before serving")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--print"]:
        for target in SOURCES:
            print(f'    "{target}": "{source_hash(target)}",')
        return 0
    found = problems()
    for line in found:
        print(line)
    if not found:
        print(f"upstream code as patched: {', '.join(f'{p} {v}' for p, v in VERSIONS.items())}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
