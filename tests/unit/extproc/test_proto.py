"""The hand-encoded responses must be byte-for-byte what the real message classes produce."""

from __future__ import annotations

import pytest
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.rpc import code_pb2, status_pb2

from meshkit.extproc import _proto
from meshkit.extproc.filter import Phase

OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
CASES = [
    ({"x-body-hash": "a" * 32}, set(), False),
    ({"x-body-hash": "é" * 200, "x-model": "m"}, {"x-old", "x-older"}, True),
    ({"x-long": "v" * 70000}, set(), False),  # multi-byte length varints
]


def expected_phase(phase: Phase, sets: dict[str, str], removes: set[str], clear: bool) -> bytes:
    common = ep.CommonResponse(clear_route_cache=clear)
    for k, v in sets.items():
        common.header_mutation.set_headers.append(
            HeaderValueOption(header=HeaderValue(key=k, raw_value=v.encode()), append_action=OVERWRITE)
        )
    common.header_mutation.remove_headers.extend(sorted(removes))
    wrapper = (
        ep.HeadersResponse if phase in (Phase.REQUEST_HEADERS, Phase.RESPONSE_HEADERS) else ep.BodyResponse
    )
    return bytes(ep.ProcessingResponse(**{phase.value: wrapper(response=common)}).SerializeToString())


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize(("sets", "removes", "clear"), CASES)
def test_ext_proc_phase_encoding(phase: Phase, sets: dict[str, str], removes: set[str], clear: bool) -> None:
    got = _proto.ExtProcResponses().phase(phase, (sets, removes, clear))
    assert ep.ProcessingResponse.FromString(got) == ep.ProcessingResponse.FromString(
        expected_phase(phase, sets, removes, clear)
    )


@pytest.mark.parametrize(("sets", "removes", "clear"), CASES)
def test_check_ok_encoding(sets: dict[str, str], removes: set[str], clear: bool) -> None:
    want = authz_pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))
    for k, v in sets.items():
        want.ok_response.headers.append(
            HeaderValueOption(header=HeaderValue(key=k, value=v), append_action=OVERWRITE)
        )
    want.ok_response.headers_to_remove.extend(sorted(removes))
    assert _proto.check_ok(sets, removes) == want.SerializeToString()


def test_cached_responses_without_values() -> None:
    responses = _proto.ExtProcResponses()
    first = responses.phase(Phase.REQUEST_HEADERS, ({}, {"x-body-hash"}, False))
    assert responses.phase(Phase.REQUEST_HEADERS, ({}, {"x-body-hash"}, False)) is first
    assert first == expected_phase(Phase.REQUEST_HEADERS, {}, {"x-body-hash"}, False)
