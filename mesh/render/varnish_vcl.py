"""A VCL program with backend declarations added: ports known only at run time, named in the VCL.

`vcl_with_backends(text, {"origin": (host, port)})` inserts one `backend NAME { .host; .port; }` per
entry right after the program's `vcl 4.x;` line (VCL requires that line first). Varnish resolves backend
hosts when the VCL compiles, so an unresolvable name fails the whole program: pass addresses. Names and
hosts are checked here, since they are written into the program text. `varnishd -C -f FILE` compiles
the result without starting a server (tests/mesh).

`meshkit_vcl(backend=..., generated_backend=..., purgers=..., ttl=..., grace=..., max_body_bytes=...)`
is meshkit's own cache VCL (`meshkit/varnish/meshkit.vcl`, shipped with the package) with its settings
block rewritten: the file runs as is with its defaults (backend 127.0.0.1:8080, PURGE from loopback,
TTL 1 h, grace 24 h, bodies up to 1 MiB cached); this is the checked way to change them.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from importlib import resources

__all__ = ["MESHKIT_VCL", "meshkit_vcl", "vcl_with_backends"]

MESHKIT_VCL = "varnish/meshkit.vcl"  # inside the meshkit package
_SETTINGS = re.compile(
    r"^# ==== meshkit settings: begin ====\n.*?^# ==== meshkit settings: end ====\n", re.S | re.M
)

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


def _duration(name: str, seconds: float) -> str:
    if not (seconds >= 0 and math.isfinite(seconds)):  # NaN fails the first, infinity the second
        raise ValueError(f"{name}: {seconds} must be 0 or more seconds (a finite number)")
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _acl_entry(source: str) -> str:
    """An ACL line for an address or a network (`10.0.0.0/8`), checked (ValueError otherwise)."""
    try:
        network = ipaddress.ip_network(source, strict=False)
    except ValueError:
        raise ValueError(f"purgers: {source!r} is not an address or a network") from None
    if network.num_addresses == 1:
        return f'    "{network.network_address}";'
    return f'    "{network.network_address}"/{network.prefixlen};'


def meshkit_vcl(
    *,
    backend: tuple[str, int] = ("127.0.0.1", 8080),
    purgers: Iterable[str] = ("127.0.0.1", "::1"),
    ttl: float = 3600,
    grace: float = 86400,
    max_body_bytes: int = 1 << 20,
    first_byte_timeout: float = 300,
    generated_backend: tuple[str, int] | None = None,
) -> str:
    """meshkit's cache VCL with its settings block set from these values (ValueError listing bad ones).

    `backend`: what Varnish fetches from; `purgers`: the client addresses or networks PURGE is accepted
    from (an empty list: from nowhere); `ttl`/`grace`: seconds, when the backend's Cache-Control says
    nothing; `max_body_bytes`: POST bodies up to this size are cached, bigger ones pass whole;
    `generated_backend`: where chat/completions/responses are fetched from (the provider, when
    `backend` is the embedding cache); None: `backend` serves every path."""
    problems: list[str] = []
    named = {"backend": backend, "generated_backend": generated_backend}
    for what, address in named.items():
        if address is None:
            continue
        host, port = address
        if not _HOST.fullmatch(host):
            problems.append(f"{what}: host {host!r}")
        if not 0 < int(port) <= 65535:
            problems.append(f"{what}: port {port!r}")
    if max_body_bytes < 0:
        problems.append(f"max_body_bytes: {max_body_bytes} must be 0 or more")
    acl: list[str] = []
    for source in purgers:
        try:
            acl.append(_acl_entry(source))
        except ValueError as exc:
            problems.append(str(exc))
    durations: dict[str, str] = {}
    for name, value in (("ttl", ttl), ("grace", grace), ("first_byte_timeout", first_byte_timeout)):
        try:
            durations[name] = _duration(name, value)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))
    entries = "".join(f"{line}\n" for line in acl)  # none: an empty ACL, PURGE from nowhere
    timeout = durations["first_byte_timeout"]
    backends = _backend("default", backend, timeout)
    pick = (
        "    # One backend serves every path. For generated answers (chat, completions, responses) from\n"
        "    # another one, declare it above and set it here: `set req.backend_hint = generated;`\n"
    )
    if generated_backend is not None:
        backends += "\n" + _backend("generated", generated_backend, timeout)
        pick = (
            '    if (req.url ~ "^/v1/(chat/completions|completions|responses)([?]|$)") {\n'
            "        set req.backend_hint = generated;\n"
            "    }\n"
        )
    settings = f"""# ==== meshkit settings: begin ====
{backends}
acl meshkit_purgers {{
{entries}}}

sub meshkit_settings_recv {{
    # POST bodies up to this many bytes are buffered and cached; bigger ones pass whole.
    set req.http.X-Meshkit-Body-Limit = "{int(max_body_bytes)}";
}}

sub meshkit_default_ttl {{
    set beresp.ttl = {durations["ttl"]};
}}

sub meshkit_default_grace {{
    set beresp.grace = {durations["grace"]};
}}

sub meshkit_pick_backend {{
{pick}}}
# ==== meshkit settings: end ====
"""
    text = shipped_vcl()
    if len(_SETTINGS.findall(text)) != 1:
        raise ValueError(f"{MESHKIT_VCL}: the settings block is missing or repeated")
    return _SETTINGS.sub(lambda _: settings, text)


def _backend(name: str, address: tuple[str, int], timeout: str) -> str:
    host, port = address
    return f"""backend {name} {{
    .host = "{host}";
    .port = "{int(port)}";
    .first_byte_timeout = {timeout};
    .between_bytes_timeout = {timeout};
}}
"""


def shipped_vcl() -> str:
    """The VCL file as shipped (its own default settings)."""
    return resources.files("meshkit").joinpath(MESHKIT_VCL).read_text()
