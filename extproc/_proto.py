"""Everything that touches Envoy's protobuf messages (xds-protos, upb): parsing helpers and builders.

Responses leave this module already serialized (`bytes`); the gRPC handlers are registered with an
identity serializer, so a response that does not depend on the request (the common case: "continue",
"continue and remove x-body-hash") is built once and reused as bytes.

Header values: ext_proc reads `HeaderValue.raw_value`; ext_authz's OK response reads `HeaderValue.value`
(Envoy 1.40; the other field arrives as an empty header). Both are handled here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from meshkit.extproc.filter import Phase, Reply

__all__ = ["CheckRequest", "DecodeError", "ExtProcResponses", "ProcessingRequest", "check_denied", "check_ok"]

ProcessingRequest = ep.ProcessingRequest
CheckRequest = authz_pb.CheckRequest

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

Mutation = tuple[dict[str, str], set[str], bool]


def identity(data: bytes) -> bytes:
    return data


# -- ext_proc ------------------------------------------------------------------------------------
def headers_of(headers: ep.HttpHeaders) -> dict[str, str]:
    """Envoy's header map as a dict (lowercase names; Envoy 1.40 sends raw_value)."""
    return {h.key: h.raw_value.decode("utf-8", "surrogateescape") or h.value for h in headers.headers.headers}


def _common(sets: dict[str, str], removes: Iterable[str], clear: bool) -> ep.CommonResponse:
    common = ep.CommonResponse(clear_route_cache=clear)
    if sets or removes:
        mutation = common.header_mutation
        for key, value in sets.items():
            mutation.set_headers.append(
                HeaderValueOption(
                    header=HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
                )
            )
        mutation.remove_headers.extend(sorted(removes))
    return common


def _wrap(phase: Phase, common: ep.CommonResponse) -> ep.ProcessingResponse:
    if phase is Phase.REQUEST_HEADERS:
        return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common))
    if phase is Phase.REQUEST_BODY:
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))
    if phase is Phase.RESPONSE_HEADERS:
        return ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=common))
    return ep.ProcessingResponse(response_body=ep.BodyResponse(response=common))


class ExtProcResponses:
    """Serialized `ProcessingResponse`s; the ones without header values are cached."""

    def __init__(self) -> None:
        self._static: dict[tuple[Phase, frozenset[str], bool], bytes] = {}

    def phase(self, phase: Phase, mutation: Mutation) -> bytes:
        sets, removes, clear = mutation
        if sets:
            return _wrap(phase, _common(sets, removes, clear)).SerializeToString()
        key = (phase, frozenset(removes), clear)
        data = self._static.get(key)
        if data is None:
            if len(self._static) > 256:  # bounded: removes are header names chosen by filter code
                self._static.clear()
            data = self._static[key] = _wrap(phase, _common({}, removes, clear)).SerializeToString()
        return data

    @staticmethod
    def trailers(phase_name: str) -> bytes:
        """The empty answer to a trailers message (only sent if Envoy is configured to)."""
        response = ep.ProcessingResponse()
        getattr(response, phase_name).SetInParent()
        return response.SerializeToString()

    @staticmethod
    def immediate(reply: Reply) -> bytes:
        response = ep.ProcessingResponse(
            immediate_response=ep.ImmediateResponse(
                status=HttpStatus(code=reply.status),  # type: ignore[arg-type]
                body=reply.body,
                details=reply.details,
            )
        )
        headers = response.immediate_response.headers
        for key, value in reply.headers:
            headers.set_headers.append(
                HeaderValueOption(
                    header=HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
                )
            )
        return response.SerializeToString()


# -- ext_authz -----------------------------------------------------------------------------------
_DENIAL_CODES = {
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED,
}
_OK_EMPTY = authz_pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK)).SerializeToString()


def check_ok(sets: dict[str, str], removes: Iterable[str]) -> bytes:
    removes = sorted(removes)
    if not sets and not removes:
        return _OK_EMPTY
    response = authz_pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))
    ok = response.ok_response
    for key, value in sets.items():
        ok.headers.append(
            HeaderValueOption(header=HeaderValue(key=key, value=value), append_action=_OVERWRITE)
        )
    ok.headers_to_remove.extend(removes)
    return response.SerializeToString()


def check_denied(reply: Reply) -> bytes:
    code = _DENIAL_CODES.get(reply.status, code_pb2.PERMISSION_DENIED)
    response = authz_pb.CheckResponse(status=status_pb2.Status(code=code, message=reply.details))
    denied = response.denied_response
    denied.status.code = reply.status  # type: ignore[assignment]
    denied.body = reply.body.decode("utf-8", "replace")
    for key, value in reply.headers:
        denied.headers.append(
            HeaderValueOption(header=HeaderValue(key=key, value=value), append_action=_OVERWRITE)
        )
    return response.SerializeToString()
