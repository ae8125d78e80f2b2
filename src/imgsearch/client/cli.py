"""The `imgsearch` command line: add, search and tag images through the gateway.

Built on Click (Pallets; typed, long-lived, with help for positionals since 8.5, a test runner and
parameter-source tracking), which lets every global option come before or after the subcommand and turns each
user mistake into one line.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from click.core import ParameterSource
from tqdm import tqdm

from imgsearch.client.channel import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, AddressError, check_address
from imgsearch.client.domain import (
    DEFAULT_K,
    FILTER_NAMES,
    SPACE_NAMES,
    HeadInfo,
    HeadSwitchStatus,
    ImageToAdd,
    ItemOutcome,
    SearchFilter,
    SearchResults,
    TagResults,
)
from imgsearch.client.sync import GatewayClient

PROG = "imgsearch"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
# Images per streaming call: results stream back as images are stored, so this only bounds one call's
# length (its deadline is at least 300 s: 512 images fit at 2 images/s) and what a dropped connection loses.
ADD_CHUNK = 512
F = TypeVar("F", bound=Callable[..., Any])


# ---- settings shared by every command -------------------------------------------------------------


@dataclass
class Settings:
    """The global options, merged from the group and from the subcommand (the later one on the line wins)."""

    address: str = DEFAULT_ADDRESS
    json: bool = False
    timeout: float = DEFAULT_TIMEOUT
    token: str | None = None
    ca_file: Path | None = None

    def client(self) -> GatewayClient:
        return GatewayClient(self.address, timeout=self.timeout, token=self.token, ca_file=self.ca_file)


def _address(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_address(value)
    except AddressError as exc:
        # A UsageError, not BadParameter, whose message would blame the environment variable even for a flag.
        raise click.UsageError(f"--address: {exc}", ctx) from None


GLOBAL_OPTIONS: list[Callable[[F], F]] = [
    click.option(
        "--address",
        envvar="IMGSEARCH_ADDRESS",
        show_envvar=True,
        default=DEFAULT_ADDRESS,
        show_default=True,
        callback=_address,
        metavar="HOST:PORT",
        help="Gateway to call; the port is required.",
    ),
    click.option("--json", "json_output", is_flag=True, default=False, show_default="off", help="Print JSON."),
    click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=DEFAULT_TIMEOUT,
        show_default=True,
        metavar="SECONDS",
        help="Deadline of each call (adding images allows at least 300 s).",
    ),
    click.option(
        "--token",
        envvar="IMGSEARCH_TOKEN",
        show_envvar=True,
        default=None,
        show_default="none",
        help="Bearer token for a secured gateway.",
    ),
    click.option(
        "--ca-file",
        envvar="IMGSEARCH_CA_FILE",
        show_envvar=True,
        default=None,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        show_default="plaintext",
        help="CA bundle: call the gateway over TLS.",
    ),
]
_GLOBAL_NAMES = {
    "address": "address",
    "json_output": "json",
    "timeout": "timeout",
    "token": "token",
    "ca_file": "ca_file",
}


def global_options(f: F) -> F:
    """Accept the global options on this command too, so they may follow the subcommand on the line."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        settings = ctx.ensure_object(Settings)
        root = ctx.parent is None
        for param, attr in _GLOBAL_NAMES.items():
            value = kwargs.pop(param)
            # The group records every value (defaults and environment too); a subcommand only what was typed.
            if root or ctx.get_parameter_source(param) == ParameterSource.COMMANDLINE:
                setattr(settings, attr, value)
        return f(*args, **kwargs)

    for option in reversed(GLOBAL_OPTIONS):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def settings() -> Settings:
    return click.get_current_context().ensure_object(Settings)


def positional(name: str, help: str, **kwargs: Any) -> Callable[[F], F]:
    return click.argument(name, help=help, **kwargs)


def k_option(what: str, page: bool = False) -> Callable[[F], F]:
    names = ["-k", "--page-size"] if page else ["-k"]
    return click.option(
        *names,
        "k",
        type=click.IntRange(min=1),
        default=DEFAULT_K,
        show_default=True,
        help=f"Number of {what} (the gateway allows up to its max_k, 1000 by default).",
    )


def space_option(f: F) -> F:
    return click.option(
        "--space",
        type=click.Choice(SPACE_NAMES),
        default="visual",
        show_default=True,
        help="visual: by appearance; semantic: by meaning (the projection head's space).",
    )(f)


def filter_option(what: str) -> Callable[[F], F]:
    return click.option(
        "--filter",
        "which",
        type=click.Choice(FILTER_NAMES),
        default="all",
        show_default=True,
        help=f"{what}: all tags, seen ones (shipped) or unseen ones (added live).",
    )


def _when(value: str) -> datetime | int:
    """An ISO date or date-time (UTC unless it says otherwise), or Unix milliseconds."""
    if value.isdigit():
        return int(value)
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is neither an ISO date (2026-11-30, 2026-11-30T08:00) nor Unix ms"
        ) from None


def _terms(values: Sequence[str]) -> dict[str, list[str]]:
    terms: dict[str, list[str]] = {}
    for raw in values:
        key, sep, value = raw.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{raw!r} is not KEY=VALUE", param_hint="'--filter'")
        # The same key given twice means either value (IN); different keys must all match (AND).
        terms.setdefault(key, []).append(value)
    return terms


def search_options(f: F) -> F:
    """--filter/--after/--before/--min-score/--page-token on every search command."""
    options = [
        click.option(
            "--filter",
            "filters",
            multiple=True,
            metavar="KEY=VALUE",
            show_default="no filter",
            help="Only images whose metadata KEY is VALUE; repeat a key for any of several values, "
            "different keys must all match.",
        ),
        click.option(
            "--after",
            "after",
            metavar="WHEN",
            show_default="any time",
            help="Only images added at or after WHEN (ISO date or Unix ms).",
        ),
        click.option(
            "--before",
            "before",
            metavar="WHEN",
            show_default="any time",
            help="Only images added before WHEN (ISO date or Unix ms).",
        ),
        click.option(
            "--min-score", type=float, default=None, show_default="none", help="Only hits scoring at least this."
        ),
        click.option(
            "--page-token",
            default="",
            show_default="first page",
            help="next_page_token of the previous page (same query and filter) for the next page.",
        ),
    ]

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        f_ = search_filter(kwargs.pop("filters"), kwargs.pop("after"), kwargs.pop("before"), kwargs.pop("min_score"))
        return f(*args, narrow=Narrowing(f_, kwargs.pop("page_token")), **kwargs)

    out: Any = wrapper
    for option in reversed(options):
        out = option(out)
    return out  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Narrowing:
    """What --filter/--after/--before/--min-score/--page-token asked for."""

    filter: SearchFilter | None
    page_token: str


def search_filter(
    filters: Sequence[str], after: str | None, before: str | None, min_score: float | None
) -> SearchFilter | None:
    if not (filters or after or before or min_score is not None):
        return None
    return SearchFilter(
        metadata=_terms(filters),
        created_after=_when(after) if after else None,
        created_before=_when(before) if before else None,
        min_score=min_score,
    )


IMAGE_FILE = click.Path(exists=True, dir_okay=False, readable=True, path_type=Path)


# ---- output ---------------------------------------------------------------------------------------


def _jsonable(o: object) -> object:
    if is_dataclass(o) and not isinstance(o, type):
        return asdict(o)
    return str(o)


def emit(payload: Any, text: str) -> None:
    if settings().json:
        click.echo(json.dumps(payload, indent=2, default=_jsonable))
    else:
        click.echo(text)


def item(number: int, name: str) -> str:
    """How every batch message names an item: its 1-based place on the command line, and what it is."""
    return f"item {number} ({name})"


def outcome_line(number: int, name: str, o: ItemOutcome, verb: str, image: bool = False) -> str:
    """One batch item's line; for an added image `changed` means created, for tags that the vocabulary changed."""
    if not o.ok:
        return f"{item(number, name)}: failed: {o.code}: {o.error}"
    renamed = "" if o.id == name else f" as {o.id}"
    if image:
        return f"{item(number, name)}: {verb}{renamed}" + ("" if o.changed else " (replaced an image with that id)")
    return f"{item(number, name)}: {verb if o.changed else 'unchanged'}"


def search_text(res: SearchResults) -> str:
    lines = [f"{i + 1:>3}. {h.score:7.4f}  {h.id}  {h.source_name}" for i, h in enumerate(res.hits)]
    if res.partial:
        lines.append(f"(partial: shards {', '.join(res.failed_shards)} did not answer)")
    if not res.hits:
        lines.append("(no results)")
    if res.next_page_token:
        lines.append(f"(more: add --page-token {res.next_page_token} for the next page)")
    return "\n".join(lines)


def tags_text(res: TagResults) -> str:
    lines = [f"{i + 1:>3}. {t.score:7.4f}  {t.tag}{'' if t.seen else '  (unseen)'}" for i, t in enumerate(res.tags)]
    return "\n".join([*lines, f"(head {res.head}, {res.vocabulary_size} tags)"])


# ---- commands -------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="imgsearch", prog_name=PROG, message="%(prog)s %(version)s")
@global_options
def cli() -> None:
    """Semantic image search and zero-shot tagging through the imgsearch gateway.

    Global options (--address, --json, --timeout, --token, --ca-file) may come before or after the command.
    """


def collect(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """(file, id) for every image under the given files and folders; ids are paths without suffix."""
    found: list[tuple[Path, str]] = []
    for p in paths:
        if p.is_dir():
            inside = [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
            if not inside:
                raise click.UsageError(f"{p}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            found.extend((f, f.relative_to(p).with_suffix("").as_posix()) for f in inside)
        else:
            found.append((p, p.stem))
    return found


def _meta(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    bad = [v for v in values if "=" not in v or not v.split("=", 1)[0]]
    if bad:
        raise click.BadParameter(f"{bad[0]!r} is not KEY=VALUE", ctx, param)
    return dict(v.split("=", 1) for v in values)


@cli.command("add")
@positional(
    "paths",
    "Image files and folders (searched recursively).",
    nargs=-1,
    required=True,
    type=click.Path(exists=True, path_type=Path),
)
@click.option(
    "--meta",
    multiple=True,
    metavar="KEY=VALUE",
    callback=_meta,
    show_default="none",
    help="Metadata for every image (repeatable).",
)
@click.option(
    "--content-ids", is_flag=True, default=False, show_default="off", help="Ids from content hashes, not file names."
)
@global_options
def add_cmd(paths: tuple[Path, ...], meta: dict[str, str], content_ids: bool) -> int:
    """Add image files or folders; ids are the file names without suffix (paths inside a folder)."""
    files = collect(paths)
    outcomes: list[ItemOutcome] = []
    # The bar counts images the gateway has stored (or refused), as it reports them, not files sent.
    bar = tqdm(total=len(files), unit="img", disable=settings().json or not sys.stderr.isatty(), file=sys.stderr)

    def stream(chunk: list[tuple[Path, str]]) -> Iterator[ImageToAdd]:
        for path, image_id in chunk:
            yield ImageToAdd.from_path(path, "" if content_ids else image_id, meta)

    with settings().client() as client:
        for start in range(0, len(files), ADD_CHUNK):
            chunk = files[start : start + ADD_CHUNK]
            done: list[ItemOutcome] = []
            for o in client.add_images_stream(stream(chunk)):
                done.append(o)
                bar.update(1)
                if not o.ok and not bar.disable:
                    # Failures show as they happen; the summary below lists them again with the rest.
                    bar.write(outcome_line(start + o.position + 1, str(chunk[o.position][0]), o, "added"), sys.stderr)
                    bar.set_postfix(failed=sum(not d.ok for d in done) + sum(not d.ok for d in outcomes))
            outcomes.extend(sorted(done, key=lambda o: o.position))
    bar.close()
    failed = sum(not o.ok for o in outcomes)
    lines = [
        outcome_line(i + 1, str(path), o, "added", image=True)
        for i, ((path, _), o) in enumerate(zip(files, outcomes, strict=True))
    ]
    lines.append(f"{len(outcomes) - failed} added, {failed} failed")
    emit({"results": outcomes, "added": len(outcomes) - failed, "failed": failed}, "\n".join(lines))
    return 1 if failed else 0


@cli.command("search-text")
@positional("query", "Free text, e.g. 'two dogs playing in the snow'.")
@k_option("results", page=True)
@search_options
@global_options
def search_text_cmd(
    query: str,
    k: int,
    narrow: Narrowing,
) -> int:
    """Find images matching a text query (semantic space)."""
    with settings().client() as client:
        res = client.search_text(query, k, narrow.filter, narrow.page_token)
    emit(res, search_text(res))
    return 0


@cli.command("search-image")
@positional("path", "Image file to search with.", type=IMAGE_FILE)
@k_option("results", page=True)
@space_option
@search_options
@global_options
def search_image_cmd(
    path: Path,
    k: int,
    space: str,
    narrow: Narrowing,
) -> int:
    """Find images similar to an image file."""
    with settings().client() as client:
        res = client.search_image(path, k, space, narrow.filter, narrow.page_token)
    emit(res, search_text(res))
    return 0


@cli.command("similar")
@positional("image_id", "Id of a stored image.", metavar="ID")
@k_option("results", page=True)
@space_option
@click.option("--include-self", is_flag=True, default=False, show_default="off", help="List the image itself too.")
@search_options
@global_options
def similar_cmd(
    image_id: str,
    k: int,
    space: str,
    include_self: bool,
    narrow: Narrowing,
) -> int:
    """Find images similar to a stored image."""
    with settings().client() as client:
        res = client.similar(image_id, k, space, include_self, narrow.filter, narrow.page_token)
    emit(res, search_text(res))
    return 0


@cli.command("more-like")
@positional("positive", "Ids of stored images the results should look like.", metavar="ID...", nargs=-1)
@click.option(
    "--not",
    "negative",
    multiple=True,
    metavar="ID",
    show_default="none",
    help="Id of a stored image the results should not look like (repeatable).",
)
@click.option("--text", default="", show_default="none", help="Text to combine with the examples (semantic space).")
@k_option("results", page=True)
@click.option(
    "--space",
    type=click.Choice(SPACE_NAMES),
    default=None,
    show_default="semantic with --text, else visual",
    help="visual: by appearance; semantic: by meaning.",
)
@search_options
@global_options
def more_like_cmd(
    positive: tuple[str, ...],
    negative: tuple[str, ...],
    text: str,
    k: int,
    space: str | None,
    narrow: Narrowing,
) -> int:
    """Relevance feedback: images like some stored images and unlike others (Rocchio), optionally with text."""
    if not positive and not text:
        raise click.UsageError("give at least one example ID or --text")
    with settings().client() as client:
        res = client.search_by_examples(positive, negative, text, k, space, narrow.filter, narrow.page_token)
    emit(res, search_text(res))
    return 0


@cli.command("tag")
@positional("path", "Image file to tag.", type=IMAGE_FILE)
@k_option("tags")
@filter_option("Which tags to rank")
@global_options
def tag_cmd(path: Path, k: int, which: str) -> int:
    """Rank the live tag vocabulary against an image file."""
    with settings().client() as client:
        res = client.tag(path, k, which)
    emit(res, tags_text(res))
    return 0


@cli.command("get")
@positional("ids", "Ids of stored images.", nargs=-1, required=True, metavar="ID...")
@global_options
def get_cmd(ids: tuple[str, ...]) -> int:
    """Show stored images by id (metadata, source, shard); exits 1 if any is not stored."""
    with settings().client() as client:
        res = client.get_images(list(ids))
    found = {i.id: i for i in res.images}
    lines = []
    for n, image_id in enumerate(ids, 1):
        im = found.get(image_id)
        if im is None:
            lines.append(f"{item(n, image_id)}: not stored")
            continue
        meta = ", ".join(f"{k}={v}" for k, v in sorted(im.metadata.items())) or "-"
        lines.append(f"{item(n, image_id)}: shard {im.shard}, source {im.source_name or '-'}, metadata {meta}")
    if res.partial:
        lines.append("(partial: some shards did not answer; their images show as not stored)")
    emit(res, "\n".join(lines))
    return 1 if res.missing_ids else 0


@cli.command("count")
@click.option("--tags", is_flag=True, default=False, show_default="off", help="Count vocabulary tags instead.")
@filter_option("With --tags: which tags to count")
@global_options
def count_cmd(tags: bool, which: str) -> int:
    """Count the stored images (per shard with --json), or with --tags the live vocabulary's tags."""
    with settings().client() as client:
        if tags:
            counted = client.count_tags(which)
            emit(counted, f"{counted.total} tags" + ("" if which == "all" else f" ({which})"))
            return 0
        images = client.count_images()
    note = f" (partial: shards {', '.join(images.failed_shards)} did not answer)" if images.partial else ""
    emit(images, f"{images.total} images{note}")
    return 0


@cli.command("delete")
@positional("ids", "Ids of stored images.", nargs=-1, required=True, metavar="ID...")
@global_options
def delete_cmd(ids: tuple[str, ...]) -> int:
    """Delete stored images by id; exits 1 if any could not be deleted."""
    with settings().client() as client:
        res = client.delete_images(list(ids))
    lines = [
        outcome_line(i + 1, image_id, o, "deleted", image=True)
        for i, (image_id, o) in enumerate(zip(ids, res.results, strict=False))
    ]
    if res.partial:
        lines.append("(partial: some shards did not answer)")
    emit({"results": res.results, "partial": res.partial}, "\n".join(lines))
    return 0 if all(o.ok for o in res.results) else 1


@cli.group("tags")
@global_options
def tags_group() -> None:
    """Manage the live tag vocabulary: new tags are ranked from the next call on."""


def _tag_batch(names: tuple[str, ...], add: bool) -> int:
    with settings().client() as client:
        outcomes = client.add_tags(list(names)) if add else client.remove_tags(list(names))
    verb = "added" if add else "removed"
    lines = [outcome_line(i + 1, name, o, verb) for i, (name, o) in enumerate(zip(names, outcomes, strict=False))]
    emit(outcomes, "\n".join(lines))
    return 0 if all(o.ok for o in outcomes) else 1


@tags_group.command("add")
@positional("names", "Tags to add (quote multi-word tags).", nargs=-1, required=True, metavar="TAG...")
@global_options
def tags_add_cmd(names: tuple[str, ...]) -> int:
    """Add tags to the vocabulary."""
    return _tag_batch(names, add=True)


@tags_group.command("remove")
@positional("names", "Tags to remove.", nargs=-1, required=True, metavar="TAG...")
@global_options
def tags_remove_cmd(names: tuple[str, ...]) -> int:
    """Remove tags from the vocabulary."""
    return _tag_batch(names, add=False)


@tags_group.command("list")
@filter_option("Which tags to list")
@global_options
def tags_list_cmd(which: str) -> int:
    """List the vocabulary; unseen (live-added) tags are marked."""
    with settings().client() as client:
        tags = list(client.list_tags(which))
    lines = [f"{t.name}{'' if t.seen else '  (unseen)'}" for t in tags]
    emit(tags, "\n".join([*lines, f"({len(tags)} tags)"]))
    return 0


@cli.group("heads")
@global_options
def heads_group() -> None:
    """List or switch the projection heads."""


def status_lines(status: HeadSwitchStatus) -> list[str]:
    if not status.building:
        return [f"active: {status.active or '-'} (no switch under way)"]
    lines = [f"active: {status.active}; building: {status.building}"]
    for p in status.shards:
        seen = "" if p.reachable else " (not answering; last numbers seen)"
        lines.append(f"  {p.shard}: {p.done}/{p.images} images{seen}")
    return lines


@heads_group.command("list")
@global_options
def heads_list_cmd() -> int:
    """Installed heads (* active, + being built) and the progress of a switch under way."""
    with settings().client() as client:
        heads = client.list_heads()
        status = client.head_status()
    emit({"heads": heads, "status": status}, "\n".join([*head_lines(heads), *status_lines(status)]))
    return 0


# The figures `heads list` shows from a head's manifest, when it has them (make eval / training write them).
HEADLINE_METRICS = (
    ("test_t2i_r1", "Flickr8k text->image R@1"),
    ("test_t2i_r10", "R@10"),
    ("kinds_test_flickr_miap", "tag MiAP"),
    ("kinds_test_imagenette_hit@1", "Imagenette tag hit@1"),
    ("kinds_test_imagenette_hit@5", "hit@5"),
    ("kinds_test_caltech_unseen_hit@5", "Caltech unseen-tag hit@5"),
)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version) if version.isdigit() else -1, version)


def head_lines(heads: list[HeadInfo]) -> list[str]:
    """Per head: mark, id, kind and what it is for; then its headline evaluation figures (or the first few)."""
    newest: dict[str, str] = {}
    for h in heads:
        if h.name not in newest or _version_key(h.version) > _version_key(newest[h.name]):
            newest[h.name] = h.version
    lines = []
    for h in heads:
        mark = "*" if h.active else ("+" if h.building else " ")
        use = h.description
        if h.version != newest[h.name]:
            use = f"superseded by {h.name}@{newest[h.name]} (kept for clusters that still run it)"
        lines.append(f"{mark} {h.name}@{h.version}  ({h.kind})  {use}".rstrip())
        figures = [f"{label} {h.metrics[key]:.1f}" for key, label in HEADLINE_METRICS if key in h.metrics]
        if not figures:
            figures = [f"{k}={v:.3g}" for k, v in sorted(h.metrics.items())[:6]]
        if figures:
            lines.append(f"      {', '.join(figures)}")
    return lines


@heads_group.command("activate")
@positional("head", "An installed head: name or name@version.")
@global_options
def heads_activate_cmd(head: str) -> int:
    """Start switching heads: the new head's space is built in the background, then it becomes active."""
    with settings().client() as client:
        switch = client.activate_head(head)
    text = f"switching to {switch.head.name}@{switch.head.version} (queries use {switch.previous} until it is built)"
    if switch.status is not None:
        text += "\n" + "\n".join(status_lines(switch.status))
    if switch.failed_shards:
        text += f"\nnot told yet: {', '.join(switch.failed_shards)} (caught up when they answer again)"
    text += "\nfollow it with `imgsearch heads list`"
    emit(switch, text)
    return 0


# ---- entry point: every failure becomes one line on stderr -----------------------------------------


def one_line(text: str) -> str:
    return " ".join(text.split())


def rpc_message(exc: grpc.RpcError, address: str, timeout: float) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = one_line((exc.details() if isinstance(exc, grpc.Call) else None) or str(exc))
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"cannot reach the gateway at {address} ({name}: {details}); is the stack running (`make up`), "
            "or is --address / IMGSEARCH_ADDRESS wrong?"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{name}: no answer from {address} within {timeout:g} s (raise --timeout)"
    return f"{name}: {details}"


def fail(message: str, code: int) -> int:
    click.echo(f"{PROG}: {one_line(message)}", err=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    current = Settings()
    try:
        rv = cli.main(args=list(argv) if argv is not None else None, prog_name=PROG, standalone_mode=False, obj=current)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else exc.format_message(), err=True)
        return 2
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else PROG
        return fail(f"{exc.format_message()} (see `{where} --help`)", exc.exit_code)
    except click.ClickException as exc:
        return fail(exc.format_message(), exc.exit_code)
    except click.Abort:
        return fail("interrupted", 130)
    except grpc.RpcError as exc:
        return fail(rpc_message(exc, current.address, current.timeout), 1)
    except OSError as exc:
        return fail(f"{exc.filename}: {exc.strerror}" if exc.filename is not None else str(exc), 1)
    except ValueError as exc:
        # The SDK's checks (address, space, filter) raise ValueError with a message written for people.
        return fail(str(exc), 1)
    return rv if isinstance(rv, int) else 0


if __name__ == "__main__":
    sys.exit(main())
