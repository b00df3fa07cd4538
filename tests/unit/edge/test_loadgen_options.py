"""`meshkit loadgen` options: bad values and impossible loads refused up front, in words, exit 2."""

from __future__ import annotations

import pytest

from meshkit.cli import main
from meshkit.edge.loadgen import LoadgenOptions, stream_url
from meshkit.edge.loadgen_resources import FD_RESERVE, capacity_problems


def test_bad_options_are_collected_together() -> None:
    problems = LoadgenOptions(
        target="sse", url="localhost:8080", conversations=0, viewers=-1, rate=0, duration=float("nan")
    ).problems()
    text = "\n".join(problems)
    for fragment in (
        "--url",
        "--conversations 0",
        "--viewers -1",
        "--rate",
        "--duration",
        "needs --nats URL",
    ):
        assert fragment in text


def test_each_publisher_names_the_url_it_needs() -> None:
    assert LoadgenOptions(target="nchan", url="http://h:1").problems() == []  # nchan publishes to --url
    assert "needs --redis URL" in " ".join(
        LoadgenOptions(target="sse", url="http://h:1", publish="redis-stream").problems()
    )


def test_stream_urls_per_target() -> None:
    sse = LoadgenOptions(target="sse", url="http://h:1/", nats="nats://n")
    assert stream_url(sse, "c1") == "http://h:1/stream/c1"
    assert stream_url(LoadgenOptions(target="sse", url="http://h:1", ws=True), "c1") == "ws://h:1/ws/c1"
    assert stream_url(LoadgenOptions(target="nchan", url="https://h:1"), "c1") == "https://h:1/sub/c1"
    assert stream_url(LoadgenOptions(target="nchan", url="http://h:1", ws=True), "c1") == "ws://h:1/sub/c1"


def test_capacity_fds_and_ports() -> None:
    assert capacity_problems(10_000, 1, 20_000, 28_000) == []
    fds = capacity_problems(20_000, 1, 20_000, 28_000)
    assert len(fds) == 1 and f"need {20_000 + FD_RESERVE} file descriptors" in fds[0]
    assert "--processes 2 or more" in fds[0]
    assert capacity_problems(20_000, 2, 20_000, 28_000) == []
    ports = capacity_problems(30_000, 4, 20_000, 28_000)
    assert len(ports) == 1 and "28000" in ports[0] and "local ports" in ports[0]


def test_cli_refuses_an_impossible_load_before_opening_anything(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "loadgen",
            "--target",
            "nchan",
            "--url",
            "http://127.0.0.1:9",
            "--conversations",
            "100000",
            "--viewers",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "local ports" in err and "Traceback" not in err


def test_cli_bad_values_exit_2_in_one_message(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["loadgen", "--target", "sse", "--url", "http://127.0.0.1:9", "--rate", "-1", "--processes", "0"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "--rate" in err and "--processes" in err and "--nats" in err and "Traceback" not in err
