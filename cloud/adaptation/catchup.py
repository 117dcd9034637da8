"""Catch-up for a cohort member that rolled back: the cohort's published updates from the version it holds.

With cohort training every member holds the cohort mirror bit for bit, and each cohort update names the
digest of the state after apply. A member whose regression guard took it back to an older cohort version can
apply none of the later cohort updates. The cloud readdresses to that member, in order, the cohort updates
that lead from the version it holds to the cohort's latest: the same payloads on the same base states, so
the member ends exactly on the cohort's mirror and applies every later cohort update again. (One freshly
compressed update from the old version would not: DWC quantizes, so its result differs from the mirror.)
"""

from __future__ import annotations

from cloud.updates.base import UpdateRecord, UpdateRegistry

CATCH_UP_KEY = "catch_up_of"
"""Metadata of a catch-up update: the id of the cohort update it readdresses."""
EVENT_KEY = "rollback_event"
"""Metadata of a catch-up update: the rollback event it answers (publishing it twice is a no-op)."""


def cohort_line(updates: UpdateRegistry, cohort: str, held: str) -> list[UpdateRecord] | None:
    """The cohort's updates from ``held`` to its latest version, oldest first: ``[]`` when ``held`` is the
    latest (or the cohort published nothing), None when ``held`` is not on the cohort's line."""
    line = updates.list(cohort=cohort)
    if not line:
        return []
    by_target = {r.target_version: r for r in line}
    chain: list[UpdateRecord] = []
    version = line[-1].target_version
    while version != held:
        record = by_target.get(version)
        if record is None or len(chain) >= len(line):
            return None
        chain.append(record)
        version = record.base_version
    return chain[::-1]


def publish_catch_up(
    updates: UpdateRegistry, device_id: str, cohort: str, held: str, event_id: int
) -> list[UpdateRecord] | None:
    """Readdress to ``device_id`` the cohort updates it lacks (see the module doc); returns what was published
    ([] when nothing is missing or this event was answered before), None when ``held`` is off the line."""
    chain = cohort_line(updates, cohort, held)
    if not chain:
        return chain
    if any(r.metadata.get(EVENT_KEY) == str(event_id) for r in updates.list(device_id=device_id)):
        return []
    out = []
    for record in chain:
        meta = {k: v for k, v in record.metadata.items() if k != "job_id"}
        meta.update({CATCH_UP_KEY: str(record.update_id), EVENT_KEY: str(event_id)})
        payload = updates.read_payload(record.update_id, 0, record.size)
        out.append(updates.publish(device_id, record.base_version, record.target_version, payload, meta))
    return out
