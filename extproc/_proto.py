"""Everything that touches Envoy's protobuf messages (xds-protos, upb): parsing helpers and builders.

Responses leave this module already serialized (`bytes`); the gRPC handlers are registered with an
identity serializer, so a response that does not depend on the request (the common case: "continue",
"continue and remove x-body-hash") is built once and reused as bytes.

Header values: ext_proc reads `HeaderValue.raw_value`; ext_authz's OK response reads `HeaderValue.value`
(Envoy 1.40; the other field arrives as an empty header). Both are handled here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from meshkit.extproc.filter import Phase, Reply

__all__ = ["CheckRequest", "DecodeError", "ExtProcResponses", "ProcessingRequest", "check_denied", "check_ok"]

ProcessingRequest = ep.ProcessingRequest
STREAMED = ProcessingMode.STREAMED  # `protocol_config.request_body_mode`: body in chunks
CheckRequest = authz_pb.CheckRequest

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

Mutation = tuple[dict[str, str], set[str], bool]


def identity(data: bytes) -> bytes:
    return data


def _serialized(message: Any) -> bytes:
    return cast(bytes, message.SerializeToString())


# -- hand-encoded responses -------------------------------------------------------------------------
# The responses that carry per-request header values are written straight in protobuf's wire format
# (about 1 µs, against about 5 µs through message objects). Field numbers come from the descriptors,
# and tests/unit/extproc/test_proto.py checks every encoder against the real message classes.
def _number(message: type, name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)  # type: ignore[attr-defined]


_ONE_BYTE = [bytes([n]) for n in range(0x80)]  # the varints of 0..127: most lengths on the request path


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(number: int) -> bytes:
    return _varint(number << 3 | 2)  # wire type 2: length-delimited


def _field(tag: bytes, payload: bytes) -> bytes:
    n = len(payload)
    return tag + (_ONE_BYTE[n] if n < 0x80 else _varint(n)) + payload


_HV_KEY = _tag(_number(HeaderValue, "key"))
_HV_VALUE = _tag(_number(HeaderValue, "value"))
_HV_RAW = _tag(_number(HeaderValue, "raw_value"))
_HVO_HEADER = _tag(_number(HeaderValueOption, "header"))
_HVO_OVERWRITE = _varint(_number(HeaderValueOption, "append_action") << 3) + _varint(
    HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
)


_KEY_FIELDS: dict[str, bytes] = {}  # HeaderValue.key fields by name: names come from filter code


def _key_field(key: str) -> bytes:
    field = _KEY_FIELDS.get(key)
    if field is None:
        if len(_KEY_FIELDS) > 256:  # bounded all the same
            _KEY_FIELDS.clear()
        field = _KEY_FIELDS[key] = _field(_HV_KEY, key.encode())
    return field


def _header_option(key: str, value: str, value_tag: bytes) -> bytes:
    # surrogateescape: a value a filter copied from a non-UTF-8 request header goes back byte for byte
    header = _key_field(key) + _field(value_tag, value.encode("utf-8", "surrogateescape"))
    return _field(_HVO_HEADER, header) + _HVO_OVERWRITE


# -- ext_proc ------------------------------------------------------------------------------------
def headers_of(headers: ep.HttpHeaders) -> dict[str, str]:
    """Envoy's header map as a dict (lowercase names; Envoy 1.40 sends raw_value)."""
    return {h.key: h.raw_value.decode("utf-8", "surrogateescape") or h.value for h in headers.headers.headers}


def _common(removes: Iterable[str], clear: bool) -> ep.CommonResponse:
    """A response without header values (those are hand-encoded by `_encode_phase`); built once, cached."""
    common = ep.CommonResponse(clear_route_cache=clear)
    if removes:
        common.header_mutation.remove_headers.extend(sorted(removes))
    return common


def _wrap(phase: Phase, common: ep.CommonResponse) -> ep.ProcessingResponse:
    if phase is Phase.REQUEST_HEADERS:
        return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common))
    if phase is Phase.REQUEST_BODY:
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))
    if phase is Phase.RESPONSE_HEADERS:
        return ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=common))
    return ep.ProcessingResponse(response_body=ep.BodyResponse(response=common))


_MUT_SET = _tag(_number(ep.HeaderMutation, "set_headers"))
_MUT_REMOVE = _tag(_number(ep.HeaderMutation, "remove_headers"))
_COMMON_MUTATION = _tag(_number(ep.CommonResponse, "header_mutation"))
_COMMON_CLEAR = _varint(_number(ep.CommonResponse, "clear_route_cache") << 3) + b"\x01"
_COMMON_BODY = _tag(_number(ep.CommonResponse, "body_mutation"))
_BODY_MUTATION_BODY = _tag(_number(ep.BodyMutation, "body"))
_WRAPPER_RESPONSE = _tag(_number(ep.HeadersResponse, "response"))  # BodyResponse: the same number
_PHASE_TAG = {phase: _tag(_number(ep.ProcessingResponse, phase.value)) for phase in Phase}


def _encode_phase(
    phase: Phase, sets: dict[str, str], removes: Iterable[str], clear: bool, body: bytes | None = None
) -> bytes:
    mutation = b"".join([_field(_MUT_SET, _header_option(k, v, _HV_RAW)) for k, v in sets.items()])
    if removes:
        mutation += b"".join(_field(_MUT_REMOVE, name.encode()) for name in sorted(removes))
    common = _field(_COMMON_MUTATION, mutation) + (_COMMON_CLEAR if clear else b"")
    if body is not None:
        common += _field(_COMMON_BODY, _field(_BODY_MUTATION_BODY, body))
    return _field(_PHASE_TAG[phase], _field(_WRAPPER_RESPONSE, common))


def skip_response_headers(*, request_body: bool) -> bytes:
    """`mode_override` bytes to append to a request-headers answer: Envoy need not send this request's
    response headers (nothing to add to them). The other modes repeat the rendered config's (an unset
    body mode would read as NONE); Envoy applies it only with `allow_mode_override: true`."""
    mode = ProcessingMode(
        request_header_mode=ProcessingMode.SEND,
        response_header_mode=ProcessingMode.SKIP,
        request_body_mode=ProcessingMode.BUFFERED if request_body else ProcessingMode.NONE,
        response_body_mode=ProcessingMode.NONE,
        request_trailer_mode=ProcessingMode.SKIP,
        response_trailer_mode=ProcessingMode.SKIP,
    )
    return _serialized(ep.ProcessingResponse(mode_override=mode))


class ExtProcResponses:
    """Serialized `ProcessingResponse`s; the ones without header values are cached."""

    def __init__(self) -> None:
        self._static: dict[tuple[Phase, frozenset[str], bool], bytes] = {}

    def phase(self, phase: Phase, mutation: Mutation) -> bytes:
        sets, removes, clear = mutation
        if sets:
            return _encode_phase(phase, sets, removes, clear)
        key = (phase, frozenset(removes), clear)
        data = self._static.get(key)
        if data is None:
            if len(self._static) > 256:  # bounded: removes are header names chosen by filter code
                self._static.clear()
            data = self._static[key] = _wrap(phase, _common(removes, clear)).SerializeToString()
        return data

    @staticmethod
    def body_replaced(mutation: Mutation, body: bytes) -> bytes:
        """The request-body answer that replaces the whole (BUFFERED) body with `body`. Envoy leaves
        content-length to the processor in that mode (BUFFERED with request headers SEND: a length
        that does not match the new body makes Envoy answer 500), so it is set here to match."""
        sets, removes, clear = mutation
        sets = {**sets, "content-length": str(len(body))}
        return _encode_phase(Phase.REQUEST_BODY, sets, set(removes) - {"content-length"}, clear, body)

    @staticmethod
    def trailers(phase_name: str) -> bytes:
        """The empty answer to a trailers message (only sent if Envoy is configured to)."""
        return _TRAILERS[phase_name]

    @staticmethod
    def immediate(reply: Reply) -> bytes:
        response = ep.ProcessingResponse(
            immediate_response=ep.ImmediateResponse(
                status=HttpStatus(code=reply.status),
                body=reply.body,
                details=reply.details,
            )
        )
        headers = response.immediate_response.headers
        for key, value in reply.headers:
            headers.set_headers.append(
                HeaderValueOption(
                    header=HeaderValue(key=key, raw_value=value.encode("utf-8", "surrogateescape")),
                    append_action=_OVERWRITE,
                )
            )
        return _serialized(response)


def _empty(phase_name: str) -> bytes:
    response = ep.ProcessingResponse()
    getattr(response, phase_name).SetInParent()
    return _serialized(response)


_TRAILERS = {name: _empty(name) for name in ("request_trailers", "response_trailers")}
# "Go on" for each response phase, unchanged: the answer to Envoy's own reply (a 400 it made before the
# filter chain saw the request), which reaches meshkit's response phases without request headers.
_RESPONSE_UNCHANGED = {
    name: _empty(name) for name in ("response_headers", "response_body", "response_trailers")
}


def response_unchanged(phase_name: str) -> bytes | None:
    """The empty answer to a response-phase message, or None for another kind."""
    return _RESPONSE_UNCHANGED.get(phase_name)


# -- ext_authz -----------------------------------------------------------------------------------
_DENIAL_CODES = {
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    429: code_pb2.RESOURCE_EXHAUSTED,
}
_OK_EMPTY = _serialized(authz_pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK)))


_OK_HEADERS = _tag(_number(authz_pb.OkHttpResponse, "headers"))
_OK_REMOVE = _tag(_number(authz_pb.OkHttpResponse, "headers_to_remove"))
_OK_ANSWER = _tag(_number(authz_pb.OkHttpResponse, "response_headers_to_add"))
_CHECK_OK = _tag(_number(authz_pb.CheckResponse, "ok_response"))


def check_ok(sets: dict[str, str], removes: Iterable[str], answer: Mapping[str, str] | None = None) -> bytes:
    """OK, with header changes (ext_authz reads `HeaderValue.value`, not raw_value) and the headers
    for the client's answer (`response_headers_to_add`)."""
    if not sets and not removes and not answer:
        return _OK_EMPTY
    ok = b"".join(_field(_OK_HEADERS, _header_option(k, v, _HV_VALUE)) for k, v in sets.items())
    if removes:
        ok += b"".join(_field(_OK_REMOVE, name.encode()) for name in sorted(removes))
    if answer:
        ok += b"".join(_field(_OK_ANSWER, _header_option(k, v, _HV_VALUE)) for k, v in answer.items())
    return _OK_EMPTY + _field(_CHECK_OK, ok)


def check_denied(reply: Reply) -> bytes:
    code = _DENIAL_CODES.get(reply.status, code_pb2.PERMISSION_DENIED)
    response = authz_pb.CheckResponse(status=status_pb2.Status(code=code, message=reply.details))
    denied = response.denied_response
    denied.status.code = reply.status
    denied.body = reply.body.decode("utf-8", "replace")
    for key, value in reply.headers:
        denied.headers.append(
            HeaderValueOption(header=HeaderValue(key=key, value=value), append_action=_OVERWRITE)
        )
    return _serialized(response)
