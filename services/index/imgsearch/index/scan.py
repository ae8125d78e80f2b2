"""Scan pages and their tokens: a position (label) signed with the shard's uuid, valid across restarts."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from imgsearch.index.store import StoredRecord
from imgsearch.kit.errors import InvalidArgument


@dataclass(frozen=True)
class ScanPage:
    records: list[StoredRecord]
    # Empty when this was the last page.
    next_page_token: str


class PageTokens:
    """Issues and checks page tokens of one shard."""

    def __init__(self, shard_uuid: str) -> None:
        # Keyed by the shard's uuid: a token of another shard (or a mangled one) fails instead of silently
        # skipping or repeating records. Tokens stay valid across restarts, so a re-projection can resume.
        self._key = shard_uuid.encode()

    def _mac(self, label: int) -> str:
        return hmac.new(self._key, f"scan:{label}".encode(), hashlib.sha256).hexdigest()[:16]

    def issue(self, label: int) -> str:
        return f"{label}.{self._mac(label)}"

    def position(self, token: str) -> int:
        """The label a token continues after; InvalidArgument unless this shard issued exactly this token."""
        label = token.partition(".")[0]
        # Labels are positive int64s; the whole token is rebuilt and compared, so only the exact form issued passes.
        if label.isascii() and label.isdigit() and len(label) <= 19:
            issued = self.issue(int(label))
            if hmac.compare_digest(issued.encode(), token.encode()):
                return int(label)
        raise InvalidArgument("page_token was not issued by this shard; start again with an empty page_token")
