"""The `imgsearch` command line: add, search and tag images through the gateway."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from imgsearch.client import DEFAULT_ADDRESS, GatewayClient, ImageToAdd, ItemOutcome, SearchResults, TagResults

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
ADD_CHUNK = 256  # images per streaming call, so a long import is acknowledged as it goes


def collect(paths: Sequence[str]) -> list[tuple[Path, str]]:
    """(file, id) for every image under the given files and folders; ids are paths without suffix."""
    found: list[tuple[Path, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((f, f.relative_to(p).with_suffix("").as_posix()))
        elif p.is_file():
            found.append((p, p.stem))
        else:
            raise SystemExit(f"imgsearch: {raw}: no such file or folder")
    return found


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=lambda o: asdict(o) if is_dataclass(o) else str(o)))  # type: ignore[arg-type]
    else:
        print(text)


def _search_text(res: SearchResults) -> str:
    lines = [f"{i + 1:>3}. {h.score:7.4f}  {h.id}  {h.source_name}" for i, h in enumerate(res.hits)]
    if res.partial:
        lines.append(f"(partial: shards {', '.join(res.failed_shards)} did not answer)")
    if not res.hits:
        lines.append("(no results)")
    return "\n".join(lines)


def _tags_text(res: TagResults) -> str:
    lines = [f"{i + 1:>3}. {t.score:7.4f}  {t.tag}{'' if t.seen else '  (unseen)'}" for i, t in enumerate(res.tags)]
    return "\n".join([*lines, f"(head {res.head}, {res.vocabulary_size} tags)"])


def _outcomes_text(items: Sequence[ItemOutcome], verb: str) -> str:
    lines = []
    for o in items:
        if o.ok:
            lines.append(f"{verb}: {o.id}" + ("" if o.changed or verb != "added" else " (replaced)"))
        else:
            lines.append(f"failed: {o.id}: {o.code}: {o.error}")
    return "\n".join(lines)


def cmd_add(args: argparse.Namespace, client: GatewayClient) -> int:
    files = collect(args.paths)
    meta = dict(kv.split("=", 1) for kv in args.meta)
    outcomes: list[ItemOutcome] = []
    bar = tqdm(total=len(files), unit="img", disable=args.json or not sys.stderr.isatty(), file=sys.stderr)

    def stream(chunk: list[tuple[Path, str]]) -> Iterator[ImageToAdd]:
        for path, image_id in chunk:
            yield ImageToAdd.from_path(path, "" if args.content_ids else image_id, meta)
            bar.update(1)

    for start in range(0, len(files), ADD_CHUNK):
        outcomes.extend(client.add_images(stream(files[start : start + ADD_CHUNK])))
    bar.close()
    failed = [o for o in outcomes if not o.ok]
    summary = f"{len(outcomes) - len(failed)} added, {len(failed)} failed"
    _emit(
        args,
        {"results": outcomes, "added": len(outcomes) - len(failed), "failed": len(failed)},
        _outcomes_text(outcomes, "added") + "\n" + summary,
    )
    return 1 if failed else 0


def cmd_search_text(args: argparse.Namespace, client: GatewayClient) -> int:
    res = client.search_text(args.query, args.k)
    _emit(args, res, _search_text(res))
    return 0


def cmd_search_image(args: argparse.Namespace, client: GatewayClient) -> int:
    res = client.search_image(Path(args.path).read_bytes(), args.k, args.space)
    _emit(args, res, _search_text(res))
    return 0


def cmd_similar(args: argparse.Namespace, client: GatewayClient) -> int:
    res = client.similar(args.id, args.k, args.space, args.include_self)
    _emit(args, res, _search_text(res))
    return 0


def cmd_tag(args: argparse.Namespace, client: GatewayClient) -> int:
    res = client.tag(Path(args.path).read_bytes(), args.k, args.filter)
    _emit(args, res, _tags_text(res))
    return 0


def cmd_tags(args: argparse.Namespace, client: GatewayClient) -> int:
    if args.action == "list":
        tags = list(client.list_tags(args.filter))
        _emit(
            args, tags, "\n".join(f"{t.name}{'' if t.seen else '  (unseen)'}" for t in tags) + f"\n({len(tags)} tags)"
        )
        return 0
    if not args.names:
        raise SystemExit(f"imgsearch: tags {args.action} needs at least one tag")
    outcomes = client.add_tags(args.names) if args.action == "add" else client.remove_tags(args.names)
    verb = "added" if args.action == "add" else "removed"
    text = "\n".join(
        f"{verb}: {o.id}" if o.ok and o.changed else (f"unchanged: {o.id}" if o.ok else f"failed: {o.id}: {o.error}")
        for o in outcomes
    )
    _emit(args, outcomes, text)
    return 0 if all(o.ok for o in outcomes) else 1


def cmd_heads(args: argparse.Namespace, client: GatewayClient) -> int:
    if args.action == "list":
        heads = client.list_heads()
        lines = []
        for h in heads:
            shown = ", ".join(f"{k}={v:.3g}" for k, v in sorted(h.metrics.items())[:6])
            lines.append(f"{'*' if h.active else ' '} {h.name}@{h.version}  ({h.kind})  {shown}")
        _emit(args, heads, "\n".join(lines))
        return 0
    if not args.head:
        raise SystemExit("imgsearch: heads activate needs a head name, name@version or file")
    switch = client.activate_head(args.head, reproject=not args.no_reproject)
    text = (
        f"active: {switch.head.name}@{switch.head.version} (was {switch.previous}); re-projected {switch.reprojected}"
    )
    if switch.failed_shards:
        text += f"\nnot finished on {', '.join(switch.failed_shards)}: run the same command again to resume"
    _emit(args, switch, text)
    return 1 if switch.failed_shards else 0


def cmd_delete(args: argparse.Namespace, client: GatewayClient) -> int:
    outcomes, partial = client.delete_images(args.ids)
    _emit(args, {"results": outcomes, "partial": partial}, _outcomes_text(outcomes, "deleted"))
    return 0 if all(o.ok for o in outcomes) else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgsearch", description="Semantic image search and zero-shot tagging.")
    p.add_argument(
        "--address",
        default=os.environ.get("IMGSEARCH_ADDRESS", DEFAULT_ADDRESS),
        help=f"gateway host:port (env IMGSEARCH_ADDRESS, default {DEFAULT_ADDRESS})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    p.add_argument("--token", default=os.environ.get("IMGSEARCH_TOKEN"), help="bearer token (env IMGSEARCH_TOKEN)")
    p.add_argument("--ca-file", type=Path, default=os.environ.get("IMGSEARCH_CA_FILE"), help="CA bundle for TLS")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("add", help="add image files or folders")
    a.add_argument("paths", nargs="+")
    a.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata for every image")
    a.add_argument("--content-ids", action="store_true", help="ids from content hashes instead of file names")
    a.set_defaults(func=cmd_add)

    for name, helptext, func in (
        ("search-text", "find images matching a text query", cmd_search_text),
        ("search-image", "find images similar to an image file", cmd_search_image),
        ("similar", "find images similar to a stored image id", cmd_similar),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument({"search-text": "query", "search-image": "path", "similar": "id"}[name])
        s.add_argument("-k", type=int, default=10, help="number of results")
        if name != "search-text":
            s.add_argument("--space", choices=["visual", "semantic"], default="visual")
        if name == "similar":
            s.add_argument("--include-self", action="store_true")
        s.set_defaults(func=func)

    t = sub.add_parser("tag", help="rank the tag vocabulary against an image file")
    t.add_argument("path")
    t.add_argument("-k", type=int, default=10)
    t.add_argument("--filter", choices=["all", "seen", "unseen"], default="all")
    t.set_defaults(func=cmd_tag)

    v = sub.add_parser("tags", help="manage the live tag vocabulary")
    v.add_argument("action", choices=["add", "remove", "list"])
    v.add_argument("names", nargs="*")
    v.add_argument("--filter", choices=["all", "seen", "unseen"], default="all")
    v.set_defaults(func=cmd_tags)

    h = sub.add_parser("heads", help="list or switch the projection heads")
    h.add_argument("action", choices=["list", "activate"])
    h.add_argument("head", nargs="?", help="for activate: name, name@version or head file on the tagger")
    h.add_argument("--no-reproject", action="store_true", help="switch without moving stored images")
    h.set_defaults(func=cmd_heads)

    d = sub.add_parser("delete", help="delete stored images by id")
    d.add_argument("ids", nargs="+")
    d.set_defaults(func=cmd_delete)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with GatewayClient(args.address, timeout=args.timeout, token=args.token, ca_file=args.ca_file) as client:
            return int(args.func(args, client))
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if code == "UNAVAILABLE" and "connect" in (details or "").lower():
            details = f"{details} (is the stack running? try `make up`; gateway address {args.address})"
        print(f"imgsearch: {code}: {details}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
