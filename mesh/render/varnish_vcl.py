"""A VCL program with backend declarations added: ports known only at run time, named in the VCL.

`vcl_with_backends(text, {"origin": (host, port)})` inserts one `backend NAME { .host; .port; }` per
entry right after the program's `vcl 4.x;` line (VCL requires that line first). Varnish resolves backend
hosts when the VCL compiles, so an unresolvable name fails the whole program: pass addresses. Names and
hosts are checked here, since they are written into the program text. `varnishd -C -f FILE` compiles
the result without starting a server (tests/mesh).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["vcl_with_backends"]

_VCL_VERSION = re.compile(r"^\s*vcl\s+\d+\.\d+\s*;[^\n]*\n?", re.MULTILINE)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_HOST = re.compile(r"[A-Za-z0-9.:_-]+")


def vcl_with_backends(vcl_text: str, backends: Mapping[str, tuple[str, int]] | None = None) -> str:
    """`vcl_text` with the `backends` declared after its `vcl 4.x;` line (ValueError when it has none)."""
    match = _VCL_VERSION.search(vcl_text)
    if match is None:
        raise ValueError("the VCL must declare its version first, e.g. `vcl 4.1;`")
    if not backends:
        return vcl_text
    problems = [f"backend name {n!r}: letters, digits and _" for n in backends if not _NAME.fullmatch(n)]
    problems += [f"backend {n}: host {h!r}" for n, (h, _) in backends.items() if not _HOST.fullmatch(h)]
    problems += [f"backend {n}: port {p!r}" for n, (_, p) in backends.items() if not 0 < int(p) <= 65535]
    if problems:
        raise ValueError("; ".join(problems))
    declarations = "".join(
        f'backend {name} {{ .host = "{host}"; .port = "{int(port)}"; }}\n'
        for name, (host, port) in backends.items()
    )
    head = match.group(0) if match.group(0).endswith("\n") else match.group(0) + "\n"
    return vcl_text[: match.start()] + head + declarations + vcl_text[match.end() :]
