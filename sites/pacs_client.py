"""What a site needs from a PACS, whatever the protocol (DICOMweb, DIMSE), and how it fails.

Every failure is one `PacsError` whose text names the PACS and, when there is one, the study:
the line hospital IT reads, and the only thing `site pull` prints before exiting non-zero.
"""

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Protocol

from sites.pacs_settings import Cohort
from sites.pacs_store import InstanceRef, InstanceStore

# Called once per instance written, with its size in bytes (the progress bar, the totals).
OnInstance = Callable[[int], None]


class PacsError(RuntimeError):
    """A PACS refused, was unreachable, lacked a study, or answered something malformed."""

    def __init__(self, pacs: str, what: str, study: str | None = None) -> None:
        self.pacs, self.study = pacs, study
        super().__init__(f"PACS {pacs}: {f'study {study}: ' if study else ''}{what}")


class PacsClient(Protocol):
    name: str

    def find_studies(self, cohort: Cohort) -> list[str]:
        """StudyInstanceUIDs matching the cohort's query (modality, since)."""
        ...

    def list_instances(self, studies: Sequence[str]) -> dict[str, list[InstanceRef]]:
        """Every instance of each study; PacsError naming the studies the PACS does not have."""
        ...

    def fetch(self, missing: Sequence[InstanceRef], whole_series: frozenset[str],
              store: InstanceStore, on_instance: OnInstance) -> None:
        """Write `missing` into `store`; `whole_series` are the series none of whose instances
        the site has yet (fetched in one request where the protocol can). PacsError naming
        the instances the PACS did not send."""
        ...

    def __enter__(self) -> "PacsClient": ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None: ...


def check_listed(pacs: str, studies: Sequence[str],
                 listing: dict[str, list[InstanceRef]]) -> dict[str, list[InstanceRef]]:
    """`listing` in the order of `studies`, or PacsError naming the studies it lacks."""
    absent = [study for study in studies if not listing.get(study)]
    if absent:
        more = f" (and {len(absent) - 1} more studies)" if len(absent) > 1 else ""
        raise PacsError(pacs, f"not on the PACS (no instance listed){more}; check the study "
                              "list or the labels file", absent[0])
    return {study: listing[study] for study in studies}


def missing_named(pacs: str, study: str, wanted: Sequence[InstanceRef], got: set[str],
                  why: str = "") -> None:
    """PacsError if the PACS sent fewer instances than asked for, naming (some of) them;
    `why` is what the PACS said, if anything."""
    lost = [ref.sop for ref in wanted if ref.sop not in got]
    if lost:
        shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
        raise PacsError(pacs, f"{len(lost)} of {len(wanted)} instances were not sent{why}: "
                              f"{shown}; the files received are kept, run the pull again", study)
