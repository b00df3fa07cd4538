from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from meshkit.errors import ConfigError
from meshkit.options import load_yaml_section, option, parse_size, resolve


@dataclass(frozen=True)
class Opts:
    size: int = option(10, "a size", parse=parse_size)
    mode: str = option("a", "a mode", choices=("a", "b"))
    names: tuple[str, ...] = option((), "names")
    on: bool = option(False, "a switch")


def test_defaults() -> None:
    assert resolve([Opts], command="x", env={})[Opts] == Opts()


def test_precedence_flags_over_env_over_yaml() -> None:
    config = {"size": "1KiB", "mode": "b", "names": ["p", "q"], "on": True}
    env = {"MESHKIT_X_SIZE": "2KiB", "MESHKIT_X_ON": "false"}
    opts = resolve([Opts], command="x", flags={"size": "3"}, env=env, config=config)[Opts]
    assert opts == Opts(size=3, mode="b", names=("p", "q"), on=False)


def test_every_problem_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        resolve(
            [Opts],
            command="x",
            flags={"size": "lots"},
            env={"MESHKIT_X_MODE": "c", "MESHKIT_X_TYPO": "1"},
            config={"colour": "red", "on": "maybe"},
        )
    text = str(err.value)
    assert len(err.value.problems) == 5
    for needle in (
        "--size: 'lots'",
        "MESHKIT_X_MODE: 'c'",
        "allowed: a, b",
        "x.colour in --config: unknown",
        "MESHKIT_X_TYPO: unknown",
        "x.on in --config: 'maybe'",
    ):
        assert needle in text


@pytest.mark.parametrize(("text", "size"), [("8MiB", 8 << 20), ("512k", 512 << 10), ("1000", 1000), (42, 42)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["0", "-1", "1.5MiB", "MiB", True])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_yaml_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("x:\n  size: 4KiB\nother: {a: 1}\n")
    assert load_yaml_section(path, "x") == {"size": "4KiB"}
    path.write_text("x: [not, a, mapping]\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_yaml_section(path, "x")
    path.write_text("x: {a: [}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml_section(path, "x")
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml_section(tmp_path / "missing.yaml", "x")


@dataclass(frozen=True)
class Other:
    depth: int = option(1, "a depth")


def test_grouped_yaml_options_reach_only_their_section() -> None:
    config = {"size": "2", "other": {"depth": 7}}
    got = resolve([Opts, Other], command="x", env={}, config=config, groups={Other: "other"})
    assert got[Opts].size == 2
    assert got[Other].depth == 7


def test_grouped_yaml_errors_name_the_group() -> None:
    with pytest.raises(ConfigError) as err:
        resolve([Opts, Other], command="x", env={}, config={"other": {"size": 1}}, groups={Other: "other"})
    assert "x.other.size in --config: unknown option of other (known: depth)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        resolve([Opts, Other], command="x", env={}, config={"other": 3}, groups={Other: "other"})
    assert "x.other in --config: must be a mapping" in str(err.value)


def test_an_option_given_twice_in_yaml_is_a_problem_not_a_coin_toss() -> None:
    """Flat and grouped, or under both spellings of the group: which value won depended on the order
    of a set of strings (PYTHONHASHSEED) or silently on the nesting."""
    groups = {Other: "other-thing"}
    for config in (
        {"depth": 1, "other-thing": {"depth": 2}},
        {"other-thing": {"depth": 1}, "other_thing": {"depth": 2}},
    ):
        with pytest.raises(ConfigError, match=r"depth in --config: given twice"):
            resolve([Opts, Other], command="x", env={}, config=config, groups=groups)
    got = resolve([Opts, Other], command="x", env={}, config={"other_thing": {"depth": 3}}, groups=groups)
    assert got[Other].depth == 3


@dataclass(frozen=True)
class Repeated:
    patterns: tuple[str, ...] = option((), "patterns, one per flag", repeat=True)
    names: tuple[str, ...] = option((), "names, comma-separated")


def test_a_repeatable_flag_keeps_every_value_and_a_plain_one_the_last() -> None:
    import argparse

    from meshkit.options import add_flags

    parser = argparse.ArgumentParser()
    add_flags(parser, [Repeated])
    args = parser.parse_args(["--patterns", "a{1,3}", "--patterns", "b", "--names", "x", "--names", "y,z"])
    opts = resolve([Repeated], command="x", flags=vars(args), env={})[Repeated]
    assert opts.patterns == ("a{1,3}", "b")  # a comma inside a value is not a separator
    assert opts.names == ("y", "z")
    untouched = resolve([Repeated], command="x", flags=vars(parser.parse_args([])), env={})[Repeated]
    assert untouched == Repeated()
