"""Write planning: the net effect of a committed batch on the id map and the FAISS indexes, as a Delta."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from imgsearch.index.state import Delta
from imgsearch.index.store import Op, SemanticOp, Slot, UpsertOp
from imgsearch.index.types import Vector


@dataclass(frozen=True)
class _Target:
    """What a label holds once a batch is applied."""

    id: str
    # True: an upsert, which replaces the visual vector and every head's vector. False: semantic writes only,
    # which add or replace the vectors of their heads and keep everything else where it is.
    replace: bool
    visual: Vector | None = None
    semantics: dict[str, Vector] = field(default_factory=dict)


def resolve(
    ops: Sequence[Op], labels: Sequence[int | None], last_seq: int, ids: Mapping[str, int], slots: Mapping[int, Slot]
) -> tuple[Delta, list[bool]]:
    """Net effect of a committed batch (later ops on the same id win) and per-op 'changed' flags.

    'changed': upsert, the id is new; delete and set_semantic, the id existed. `ids` and `slots` are the
    in-memory state before the batch.
    """
    final: dict[int, _Target | None] = {}
    seen: dict[str, int | None] = {}
    changed: list[bool] = []
    changes = 0
    for op, label in zip(ops, labels, strict=True):
        prior = seen[op.id] if op.id in seen else ids.get(op.id)
        if isinstance(op, UpsertOp):
            assert label is not None
            changed.append(prior is None)
            seen[op.id] = label
            final[label] = _Target(op.id, True, op.visual, dict(op.semantics))
            changes += 1
        elif isinstance(op, SemanticOp):
            changed.append(label is not None)
            if label is not None:
                # On top of an upsert or semantic write earlier in this batch, or of what the label holds now.
                base = final.get(label) or _Target(op.id, False)
                final[label] = _Target(
                    base.id, base.replace, base.visual, {**base.semantics, op.semantic_head: op.semantic}
                )
                changes += 1
        else:
            changed.append(label is not None)
            if label is not None:
                seen[op.id] = None
                final[label] = None
                changes += 1
    delta = Delta(last_seq=last_seq, changes=changes)
    for label, target in final.items():
        old = slots.get(label)
        if target is None or target.replace:
            if old is not None:
                if old.has_visual:
                    delta.drop_visual.append(label)
                for head in old.heads:
                    delta.drop_heads.setdefault(head, []).append(label)
            if target is None:
                delta.slots[label] = None
                continue
            if target.visual is not None:
                delta.add_visual[0].append(label)
                delta.add_visual[1].append(target.visual)
            heads = frozenset(target.semantics)
            has_visual = target.visual is not None
        else:
            held = old.heads if old is not None else frozenset()
            for head in held & target.semantics.keys():
                delta.drop_heads.setdefault(head, []).append(label)
            heads = held | target.semantics.keys()
            has_visual = old is not None and old.has_visual
        for head, vec in target.semantics.items():
            group = delta.add_heads.setdefault(head, ([], []))
            group[0].append(label)
            group[1].append(vec)
        delta.slots[label] = Slot(target.id, has_visual, heads)
    return delta, changed
