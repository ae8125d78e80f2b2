"""The `imgsearch` CLI against the in-process fake gateway: global options anywhere, one-line errors, JSON."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from imgsearch.client.cli import cli, head_lines, main
from imgsearch.client.domain import HeadInfo
from tests.unit.test_client import PNG, FakeGateway, serve


@pytest.fixture()
def fake() -> FakeGateway:
    return FakeGateway()


@pytest.fixture()
def address(fake: FakeGateway) -> Iterator[str]:
    with serve(fake) as addr:
        yield addr


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "cat.png").write_bytes(PNG)
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "sub" / "dog.png").write_bytes(PNG)
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == "imgsearch 0.1.0"


@pytest.mark.parametrize("place", ["before", "after"])
def test_global_options_work_before_or_after_the_subcommand(
    capsys: pytest.CaptureFixture[str], fake: FakeGateway, address: str, photos: Path, place: str
) -> None:
    options = ["--address", address, "--json", "--token", "t0k", "--timeout", "5"]
    argv = [*options, "tag", str(photos / "cat.png"), "-k", "2"]
    if place == "after":
        argv = ["tag", str(photos / "cat.png"), *options, "-k", "2"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    doc = json.loads(out)
    assert [t["tag"] for t in doc["tags"]] == ["cat", "dog"] and doc["head"] == "default@1"
    request, metadata = fake.last("TagImage")
    assert request.k == 2 and metadata["authorization"] == "Bearer t0k"


def test_nested_commands_take_global_options_too(
    capsys: pytest.CaptureFixture[str], address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGSEARCH_ADDRESS", "127.0.0.1:1")  # wrong on purpose: the flag must win
    code, out, err = run(capsys, "tags", "list", "--filter", "seen", "--address", address, "--json")
    assert code == 0, err
    assert [t["name"] for t in json.loads(out)] == ["cat", "dog", "kite"]
    code, out, _ = run(capsys, "tags", "--json", "--address", address, "list")
    assert code == 0 and len(json.loads(out)) == 3


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["tag", "no-such.png"], "File 'no-such.png' does not exist"),
        (["tag", "."], "is a directory"),
        (["search-image", "."], "is a directory"),
        (["tag", "{photo}", "-k", "-3"], "-3 is not in the range x>=1"),
        (["tag", "{photo}", "-k", "0"], "0 is not in the range x>=1"),
        (["search-text", "cats", "-k", "zero"], "'zero' is not a valid integer"),
        (["--address", "127.0.0.1", "search-text", "cats"], "'127.0.0.1' has no port"),
        (["search-text", "cats", "--address", "127.0.0.1"], "'127.0.0.1' has no port"),
        (["add", "no-such-folder/"], "does not exist"),
        (["add", "{photo}", "--meta", "album"], "'album' is not KEY=VALUE"),
        (["add", "{empty}"], "no image files"),
        (["similar"], "Missing argument 'ID'"),
        (["tags", "add"], "Missing argument 'TAG...'"),
        (["search-text", "cats", "--space", "semantic"], "No such option '--space'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["--timeout", "0", "count"], "0 is not in the range x>0"),
    ],
)
def test_each_user_mistake_is_one_line_and_a_nonzero_exit(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], words: str
) -> None:
    photo = tmp_path / "cat.png"
    photo.write_bytes(PNG)
    (tmp_path / "empty").mkdir()
    argv = [a.format(photo=photo, empty=tmp_path / "empty") for a in argv]
    code, out, err = run(capsys, *argv)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("imgsearch: ") and words in err, err


def test_server_errors_print_the_status_message(capsys: pytest.CaptureFixture[str], address: str, photos: Path) -> None:
    cases = [
        (["similar", "ghost"], "NOT_FOUND: image 'ghost' is not stored"),
        (["tag", str(photos / "broken.png")], "INVALID_ARGUMENT: image is empty or not a decodable image"),
        (["heads", "activate", "nope"], "NOT_FOUND: no head 'nope'"),
    ]
    for argv, words in cases:
        code, out, err = run(capsys, *argv, "--address", address)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.strip() == f"imgsearch: {words}"


def test_an_unreachable_gateway_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    code, out, err = run(capsys, "--address", f"127.0.0.1:{port}", "count")
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1
    assert f"cannot reach the gateway at 127.0.0.1:{port}" in err and "make up" in err


def test_batches_number_items_the_same_way_everywhere(
    capsys: pytest.CaptureFixture[str], fake: FakeGateway, address: str, photos: Path
) -> None:
    code, out, _ = run(capsys, "--address", address, "add", str(photos), "--meta", "album=x")
    lines = out.splitlines()
    assert code == 1
    assert lines[0] == f"item 1 ({photos / 'broken.png'}): failed: INVALID_ARGUMENT: not an image"
    assert lines[1] == f"item 2 ({photos / 'cat.png'}): added as cat"
    assert lines[2] == f"item 3 ({photos / 'sub' / 'dog.png'}): added as sub/dog"
    assert lines[-1] == "2 added, 1 failed"
    assert dict(fake.images["cat"].metadata) == {"album": "x"}

    code, out, _ = run(capsys, "tags", "add", "feline", " ", "cat", "--address", address)
    assert code == 1
    assert out.splitlines() == [
        "item 1 (feline): added",
        "item 2 ( ): failed: INVALID_ARGUMENT: tag is empty",
        "item 3 (cat): unchanged",
    ]

    code, out, _ = run(capsys, "delete", "cat", "ghost", "--address", address)
    assert code == 1
    assert out.splitlines() == ["item 1 (cat): deleted", "item 2 (ghost): failed: NOT_FOUND: ghost is not stored"]

    code, out, _ = run(capsys, "get", "sub/dog", "cat", "--address", address)
    assert code == 1
    assert out.splitlines() == [
        f"item 1 (sub/dog): shard s0, source {photos / 'sub' / 'dog.png'}, metadata album=x",
        "item 2 (cat): not stored",
    ]


def test_get_count_and_the_other_commands(
    capsys: pytest.CaptureFixture[str], fake: FakeGateway, address: str, photos: Path
) -> None:
    assert run(capsys, "add", str(photos / "cat.png"), "--address", address)[0] == 0
    code, out, _ = run(capsys, "get", "cat", "--json", "--address", address)
    doc = json.loads(out)
    assert code == 0 and doc["images"][0]["id"] == "cat" and doc["missing_ids"] == []
    code, out, _ = run(capsys, "count", "--address", address)
    assert (code, out.strip()) == (0, "1 images")
    code, out, _ = run(capsys, "count", "--json", "--address", address)
    assert json.loads(out) == {"total": 1, "shards": {"s0": 1}, "partial": False, "failed_shards": []}
    code, out, _ = run(capsys, "count", "--tags", "--address", address)
    assert (code, out.strip()) == (0, "3 tags")
    code, out, _ = run(capsys, "count", "--tags", "--filter", "unseen", "--json", "--address", address)
    assert json.loads(out) == {"filter": "unseen", "total": 0}
    for argv in (
        ["search-text", "a cat"],
        ["search-image", str(photos / "cat.png"), "--space", "semantic"],
        ["similar", "cat", "--include-self"],
        ["tags", "list"],
        ["tags", "remove", "kite"],
        ["heads", "list"],
        ["heads", "activate", "conse"],
    ):
        code, out, err = run(capsys, *argv, "--address", address)
        assert code == 0 and out and not err, (argv, err)
    code, out, _ = run(capsys, "heads", "activate", "conse", "--address", address)
    assert out.splitlines()[:3] == [
        "switching to conse@1 (queries use default@1 until it is built)",
        "active: default@1; building: conse@1",
        "  s0: 0/1 images",
    ]
    assert fake.last("SearchByText")[0].k == 10 and fake.last("SearchByImage")[0].space == 2


def _commands(group: click.Group, ctx: click.Context) -> Iterator[click.Command]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None
        yield command
        if isinstance(command, click.Group):
            yield from _commands(command, ctx)


def test_every_option_and_positional_has_help_and_shows_its_default() -> None:
    ctx = click.Context(cli)
    commands = [cli, *_commands(cli, ctx)]
    for command in commands:
        assert command.help, command.name
        for param in command.params:
            if isinstance(param, click.Option) and param.name not in ("help", "version"):
                assert param.help and param.show_default not in (None, False), (command.name, param.name)
            elif isinstance(param, click.Argument):
                assert param.help, (command.name, param.name)
    tag = cli.get_command(ctx, "tag")
    assert tag is not None
    help_text = tag.get_help(click.Context(tag, info_name="tag"))
    assert "Image file to tag." in help_text and "[default: 10; x>=1]" in help_text


def test_the_installed_command_never_shows_a_traceback() -> None:
    for argv in (["tag", "-k", "-3", "x.png"], ["--address", f"127.0.0.1:{closed_port()}", "tags", "list"]):
        proc = subprocess.run(
            [sys.executable, "-m", "imgsearch.client.cli", *argv], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_heads_list_says_what_each_head_is_for_its_headline_figures_and_which_are_superseded() -> None:
    figures = {"test_t2i_r1": 26.58, "test_t2i_r10": 69.38, "kinds_test_flickr_miap": 40.53, "dev_x": 1.0}
    heads = [
        HeadInfo("default", "5", "linear", True, figures, "m@1", description="all kinds of photos"),
        HeadInfo("default", "4", "linear", False, {"test_t2i_r10": 67.02}, "m@1", description="all kinds of photos"),
        HeadInfo("custom", "10", "mlp", False, {"b": 2.0, "a": 0.5}, "m@1", building=True),
        HeadInfo("custom", "9", "mlp", False, {}, "m@1", description="older"),
    ]
    assert head_lines(heads) == [
        "* default@5  (linear)  all kinds of photos",
        "      Flickr8k text->image R@1 26.6, R@10 69.4, tag MiAP 40.5",
        "  default@4  (linear)  superseded by default@5 (kept for clusters that still run it)",
        "      R@10 67.0",
        "+ custom@10  (mlp)",
        "      a=0.5, b=2",
        "  custom@9  (mlp)  superseded by custom@10 (kept for clusters that still run it)",
    ]
