"""`--mirror-of STREAM@DOMAIN`: what the edge mirror follows, parsed before anything reaches NATS (the
domain becomes part of an API subject, `$JS.<domain>.API`: no dots, wildcards or spaces)."""

from __future__ import annotations

import pytest

from meshkit.edge.edge_mirror import MirrorSource, mirror_config, parse_mirror_of


def test_stream_at_domain() -> None:
    source = parse_mirror_of("CHAT@origin")
    assert source == MirrorSource("CHAT", "origin")
    assert source.api_prefix == "$JS.origin.API" and str(source) == "CHAT@origin"


@pytest.mark.parametrize(
    "text", ["CHAT", "@origin", "CHAT@", "CHAT@or.igin", "CHAT@>", "CH*T@origin", "CHAT@a b", "C@o@x"]
)
def test_anything_else_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not STREAM@DOMAIN"):
        parse_mirror_of(text)


def test_the_mirror_keeps_the_token_streams_limits_and_has_no_subjects() -> None:
    config = mirror_config("CHAT_EDGE", MirrorSource("CHAT", "origin"))
    assert config.subjects is None and config.mirror is not None
    assert config.max_age == 24 * 3600.0 and config.max_bytes == 1 << 30
