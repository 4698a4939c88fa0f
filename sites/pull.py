"""`fedhealth site pull`: bring a site folder up to date with its cohort on the hospital's PACS.

Every study of the cohort is listed before a byte is transferred, so a study the PACS lacks
stops the pull before it starts; then only the instances the folder lacks are fetched
(sites/pacs_store.py), and the pull ends with how many were new and the `site check` report
of the folder. `fedhealth site start` calls `pull` the same way when site.toml has [pacs].
"""

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sites.pacs_settings import DicomwebPacs, PacsSettingsError, PullSettings, pull_settings

if TYPE_CHECKING:  # the protocol modules load with the command: they import requests, pydicom
    from sites.pacs_client import PacsClient


@dataclass(frozen=True)
class PullResult:
    """What one pull did; `new` instances (`bytes` of them) were written, `present` were there."""

    pacs: str
    studies: int
    listed: int
    present: int
    new: int
    bytes: int
    seconds: float

    def summary(self, out: Path) -> str:
        return (f"{self.new} new instances ({self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s) "
                f"from PACS {self.pacs}; {self.present} of {self.listed} instances of "
                f"{self.studies} studies were already in {out}")


def open_client(settings: PullSettings) -> "PacsClient":
    """The client for the settings' protocol (imported here: each pulls in its own library)."""
    if isinstance(settings.pacs, DicomwebPacs):
        from sites.pacs_dicomweb import DicomwebClient

        return DicomwebClient(settings.pacs)
    from sites.pacs_dimse import DimseClient

    return DimseClient(settings.pacs)


def pull(settings: PullSettings, out: Path, *, audit_log: Path | None = None,
         on_start: Callable[[int], None] = lambda total: None,
         on_instance: Callable[[int], None] = lambda size: None) -> PullResult:
    """Fetch the cohort's instances that `out` lacks; PacsError (nothing half-written) if not.

    `on_start` gets the number of instances to fetch, `on_instance` each one's size. Each
    pull, failed or not, is one line of `audit_log`: when, which PACS, how many studies
    (and a hash of their UIDs), instances and bytes; never a patient attribute.
    """
    from sites.pacs_client import PacsError
    from sites.pacs_store import InstanceStore, StoreBusy

    started = time.monotonic()
    try:
        store = InstanceStore(out)
    except StoreBusy as err:
        raise PacsError(settings.pacs.name, str(err)) from None
    counts = {"studies": 0, "listed": 0, "present": 0, "new": 0, "bytes": 0}
    cohort: list[str] = []

    def written(size: int) -> None:
        counts["new"] += 1
        counts["bytes"] += size
        on_instance(size)

    def result() -> PullResult:
        return PullResult(settings.pacs.name, **counts, seconds=time.monotonic() - started)

    try:
        with open_client(settings) as client:
            cohort = _cohort_studies(client, settings)
            listing = client.list_instances(cohort)
            counts["studies"] = len(cohort)
            counts["listed"] = sum(map(len, listing.values()))
            refs = [ref for study_refs in listing.values() for ref in study_refs]
            missing = [ref for ref in refs if not store.has(ref)]
            counts["present"] = counts["listed"] - len(missing)
            on_start(len(missing))
            if missing:
                started_series = {r.series for r in set(refs) - set(missing)}
                whole = frozenset({r.series for r in missing} - started_series)
                client.fetch(missing, whole, store, written)
    except PacsError as err:
        _audit(audit_log, settings, cohort, result(), str(err))
        raise
    finally:
        store.close()
    done = result()
    _audit(audit_log, settings, cohort, done, None)
    return done


def _cohort_studies(client: "PacsClient", settings: PullSettings) -> list[str]:
    cohort = settings.cohort
    if not cohort.is_query:
        return list(cohort.study_uids or ())
    found = client.find_studies(cohort)
    if cohort.study_uids is None:
        return found
    matching = set(found)
    return [uid for uid in cohort.study_uids if uid in matching]


def _audit(path: Path | None, settings: PullSettings, cohort: list[str], result: PullResult,
           error: str | None) -> None:
    if path is None:
        return
    from sites.audit import AuditLog

    AuditLog(path).record_pull({
        "pacs": result.pacs, "protocol": "dicomweb" if isinstance(settings.pacs, DicomwebPacs)
        else "dimse", "studies": result.studies,
        "cohort_sha256": hashlib.sha256("\n".join(sorted(cohort)).encode()).hexdigest(),
        "instances": result.new, "bytes": result.bytes, "present": result.present,
        "seconds": round(result.seconds, 3), "error": error})


def pull_command(
    out: Annotated[Path, typer.Option(help="The site's folder: pulled files go to "
                                           "OUT/<study>/<series>/<instance>.dcm.")],
    dicomweb: Annotated[str | None, typer.Option(
        help="The PACS's DICOMweb root URL, e.g. https://pacs.example.org/dicom-web.")] = None,
    dimse: Annotated[str | None, typer.Option(help="A DIMSE PACS as HOST:PORT (C-FIND + C-GET).")] = None,
    aet: Annotated[str | None, typer.Option(
        help="DIMSE: this site's AE title, as the PACS knows it.")] = None,
    called_aet: Annotated[str | None, typer.Option(help="DIMSE: the PACS's AE title.")] = None,
    user: Annotated[str | None, typer.Option(help="DICOMweb account (basic authentication).")] = None,
    password_file: Annotated[Path | None, typer.Option(
        help="File holding the account's password, readable by you only (chmod 600); or set "
             "FEDHEALTH_PACS_PASSWORD.")] = None,
    token_file: Annotated[Path | None, typer.Option(
        help="File holding a bearer token (chmod 600); or set FEDHEALTH_PACS_TOKEN.")] = None,
    ca_file: Annotated[Path | None, typer.Option(
        help="PEM CA certificate(s) to verify the PACS's TLS certificate (default: the system's).")] = None,
    study_uids: Annotated[Path | None, typer.Option(
        help="The cohort: a file with one StudyInstanceUID a line.")] = None,
    labels: Annotated[Path | None, typer.Option(
        help="The cohort: the label manifest's StudyInstanceUIDs; also the site check's labels.")] = None,
    modality: Annotated[str | None, typer.Option(help="The cohort: studies with this modality.")] = None,
    since: Annotated[str | None, typer.Option(help="The cohort: studies since YYYYMMDD.")] = None,
    audit_log: Annotated[Path | None, typer.Option(
        help="Append one line per pull here (default: OUT.audit.jsonl next to OUT).")] = None,
) -> None:
    """Pull a cohort's studies from the PACS into OUT: bit-exact, resumable, only what OUT lacks;
    then report OUT as `fedhealth site check` does."""
    from sites.pacs_client import PacsError
    from sites.site_check import check_command

    console = Console(stderr=True)
    options = {"dicomweb": dicomweb, "dimse": dimse, "aet": aet, "called-aet": called_aet,
               "user": user, "password-file": password_file, "token-file": token_file,
               "ca-file": ca_file, "study-uids": study_uids, "modality": modality, "since": since}
    try:
        settings = pull_settings(options, base=Path.cwd(), where="site pull", labels=labels)
    except PacsSettingsError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(2) from None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("instances, {task.fields[mb]:.1f} MB"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"pulling from {settings.pacs.name}", total=None, mb=0.0)
        try:
            result = pull(settings, out, audit_log=audit_log or out.with_name(f"{out.name}.audit.jsonl"),
                          on_start=lambda total: bar.update(task, total=total),
                          on_instance=lambda size: bar.update(
                              task, advance=1, mb=bar.tasks[0].fields["mb"] + size / 1e6))
        except PacsError as err:
            bar.stop()
            console.print(f"[red]error:[/red] {escape(str(err))}", soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as err:  # the site's own disk: full, read-only, OUT a file
            bar.stop()
            console.print(f"[red]error:[/red] cannot write into {escape(str(out))}: "
                          f"{escape(err.strerror or str(err))}; files already pulled are kept",
                          soft_wrap=True)
            raise typer.Exit(1) from None
    Console().print(result.summary(out), soft_wrap=True)  # the report, on stdout with the check's
    check_command(out, labels=labels)
