"""Text -> image recall as served: Flickr8k test photos added to a real local stack, every caption a query.

`make eval` scores heads offline with the fp32 models; this measures what a client gets from the running gateway
(the encoder's served models, the active head, its search hubness fold, the shards' indexes), over the standard
1000-photo test split and its 5000 captions.

    python -m imgsearch.training.served_retrieval --data ../shared/data/flickr8k
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from imgsearch.client import GatewayClient, ImageToAdd

# Queries per SearchByTexts call (the gateway's default limit).
BATCH = 64
KS = (1, 5, 10)


def split_photos(flickr: Path, split: str = "test") -> list[Path]:
    return [flickr / "images" / name for name in (flickr / "splits" / f"{split}.txt").read_text().split()]


def caption_queries(flickr: Path, photos: Sequence[Path]) -> list[tuple[str, str]]:
    """(caption, id of its photo) for every caption of the photos; a photo's id is its file stem."""
    wanted = {p.name for p in photos}
    with (flickr / "captions.csv").open(newline="") as fh:
        return [(row["caption"], Path(row["image"]).stem) for row in csv.DictReader(fh) if row["image"] in wanted]


def add_photos(client: GatewayClient, photos: Sequence[Path]) -> None:
    outcomes = client.add_images(ImageToAdd.from_path(p, p.stem) for p in photos)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} photos were not stored, e.g. {failed[0]}")


@dataclass(frozen=True)
class ServedRecall:
    """R@k (percent) for each k of KS, and the head that ranked (name@version)."""

    head: str
    recall: dict[int, float]


def served_recall(client: GatewayClient, queries: Sequence[tuple[str, str]]) -> ServedRecall:
    """How often each caption query's own photo is among the gateway's top 1, 5 and 10."""
    hits_at = dict.fromkeys(KS, 0)
    head = ""
    for start in range(0, len(queries), BATCH):
        chunk = queries[start : start + BATCH]
        for (query, target), result in zip(chunk, client.search_texts([q for q, _ in chunk], k=max(KS)), strict=True):
            if result.results is None:
                raise RuntimeError(f"query {query!r} failed: {result.error}")
            head = result.results.head
            ids = [h.id for h in result.results.hits]
            for cut in KS:
                hits_at[cut] += target in ids[:cut]
    return ServedRecall(head, {cut: 100.0 * n / max(len(queries), 1) for cut, n in hits_at.items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="Flickr8k directory")
    parser.add_argument("--address", help="a running gateway to use instead of a fresh local stack (its images stay)")
    args = parser.parse_args(argv)
    photos = split_photos(args.data)
    queries = caption_queries(args.data, photos)

    def run(address: str) -> tuple[ServedRecall, float]:
        with GatewayClient(address, timeout=600) as client:
            add_photos(client, photos)
            t0 = time.perf_counter()
            return served_recall(client, queries), time.perf_counter() - t0

    if args.address:
        result, seconds = run(args.address)
    else:
        from imgsearch.devstack import Stack, free_port_range

        with tempfile.TemporaryDirectory() as tmp:
            stack = Stack(Path(tmp))
            specs = stack.up(free_port_range(20), free_port_range(20), shards=2, timeout=300)
            try:
                result, seconds = run(next(s for s in specs if s.name == "gateway").address)
            finally:
                stack.down()
    cmd = ["python", "-m", "imgsearch.training.served_retrieval", *(sys.argv[1:] if argv is None else argv)]
    recall = ", ".join(f"R@{k} {v:.1f}" for k, v in result.recall.items())
    print(
        f"head {result.head}: {len(queries)} captions over {len(photos)} photos, text -> image {recall} "
        f"({seconds:.0f} s of queries); command: {shlex.join(cmd)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
