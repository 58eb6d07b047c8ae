"""Every change to an adapter, written once as a pure function on its `AdapterState`.

Backends run these inside their atomic `commit` (Redis may run one several times after a conflict, so they
only touch the state they are given and the result holder they return). Each returns the events that
describe it, which is what keeps the change log exactly in step with the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from adapters_registry.errors import NotFoundError
from adapters_registry.names import LATEST_TAG, Ref
from adapters_registry.records import AdapterState, Event, VersionRecord, utc_now
from adapters_registry.storage import Mutation


def version_in(state: AdapterState | None, ref: Ref) -> int:
    """The version `ref` names in `state`; NotFoundError naming what is missing."""
    if state is None or not state.versions:
        raise NotFoundError(f"adapter {ref.name} not found")
    if ref.version is not None:
        if ref.version not in state.versions:
            raise NotFoundError(f"{ref.name} has no version {ref.version} (versions: {_listing(state)})")
        return ref.version
    tag = ref.tag or LATEST_TAG
    if tag not in state.tags:
        raise NotFoundError(f"{ref.name} has no tag {tag!r} (tags: {', '.join(sorted(state.tags))})")
    return state.tags[tag]


def _listing(state: AdapterState) -> str:
    return ", ".join(str(v) for v in sorted(state.versions))


@dataclass
class Outcome:
    """Filled by a mutation for its caller: the records it created or removed."""

    records: list[VersionRecord] = field(default_factory=list)


def publish(draft: VersionRecord, tags: Sequence[str], outcome: Outcome) -> Mutation:
    def mutate(state: AdapterState) -> list[Event]:
        version = state.counter + 1
        record = msgspec.structs.replace(draft, version=version)
        state.counter = version
        state.versions[version] = record
        all_tags = sorted({LATEST_TAG, *tags})
        for tag in all_tags:
            state.tags[tag] = version
        outcome.records[:] = [record]
        return [Event("publish", draft.name, version, tags=all_tags, sha256=record.sha256, time=utc_now())]

    return mutate


def set_tag(ref: Ref, tag: str, outcome: Outcome) -> Mutation:
    def mutate(state: AdapterState) -> list[Event]:
        version = version_in(state, ref)
        state.tags[tag] = version
        outcome.records[:] = [state.versions[version]]
        return [Event("tag", ref.name, version, tag=tag, time=utc_now())]

    return mutate


def remove_tag(name: str, tag: str) -> Mutation:
    def mutate(state: AdapterState) -> list[Event]:
        if not state.versions or tag not in state.tags:
            raise NotFoundError(f"{name} has no tag {tag!r}")
        version = state.tags.pop(tag)
        return [Event("untag", name, version, tag=tag, time=utc_now())]

    return mutate


def delete_version(ref: Ref, outcome: Outcome) -> Mutation:
    """Remove one version and the tags on it; `latest` moves to the newest remaining version."""

    def mutate(state: AdapterState) -> list[Event]:
        version = version_in(state, ref)
        outcome.records[:] = [state.versions.pop(version)]
        removed = state.tags_of(version)
        for tag in removed:
            del state.tags[tag]
        events = [Event("delete", ref.name, version, tags=removed, time=utc_now())]
        if LATEST_TAG in removed and state.versions:
            state.tags[LATEST_TAG] = max(state.versions)
            events.append(Event("tag", ref.name, state.tags[LATEST_TAG], tag=LATEST_TAG, time=utc_now()))
        return events

    return mutate


def delete_name(name: str, outcome: Outcome) -> Mutation:
    """Remove every version and tag; the counter stays so numbers are never reused for other weights."""

    def mutate(state: AdapterState) -> list[Event]:
        if not state.versions:
            raise NotFoundError(f"adapter {name} not found")
        outcome.records[:] = [state.versions[v] for v in sorted(state.versions)]
        removed = sorted(state.tags)
        state.versions.clear()
        state.tags.clear()
        return [Event("delete", name, None, tags=removed, time=utc_now())]

    return mutate
