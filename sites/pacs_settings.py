"""Which PACS a site pulls from and which studies: one reading of `site pull`'s options and of
site.toml's [pacs] section (the same names in both), checked before anything connects.

Secrets never come from here as values: only the name of an owner-only file (or an environment
variable), so a password is never on a command line, in a shell history or in site.toml.
"""

import csv
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from fedhealth.core.secret_file import SecretFileError, read_secret

# Where a secret may come from instead of a file (a service manager's credential store, CI).
PASSWORD_ENV = "FEDHEALTH_PACS_PASSWORD"
TOKEN_ENV = "FEDHEALTH_PACS_TOKEN"
# The keys of site.toml's [pacs] section; `fedhealth site pull` has one --option per key.
PACS_SECTION = "pacs"
PACS_KEYS = ("dicomweb", "dimse", "aet", "called-aet", "user", "password-file", "token-file",
             "ca-file", "study-uids", "modality", "since")
_PATH_KEYS = ("password-file", "token-file", "ca-file", "study-uids")
# DICOM UIDs: digits and dots, at most 64 characters (PS3.5 9.1). Also what makes them safe as
# file names: a PACS cannot steer a pulled file out of the site folder.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*", re.ASCII)
_AE_TITLE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}", re.ASCII)  # PS3.5 AE: no backslash


class PacsSettingsError(ValueError):
    """A PACS or cohort setting is missing, contradictory or malformed."""


def is_uid(text: str) -> bool:
    return len(text) <= 64 and _UID.fullmatch(text) is not None


@dataclass(frozen=True)
class DicomwebPacs:
    """A DICOMweb service (QIDO-RS + WADO-RS) and how to log in to it."""

    url: str
    user: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None
    ca_file: Path | None = None  # None: the system's trust store

    @property
    def name(self) -> str:
        return self.url

    def auth(self) -> tuple[str, str] | str | None:
        """(user, password) for basic auth, a bearer token, or None: read now, from the
        owner-only file or the environment, never kept in settings or logs."""
        if self.token_file is not None or (self.user is None and os.environ.get(TOKEN_ENV)):
            return _secret(self.token_file, TOKEN_ENV, f"token for PACS {self.url}")
        if self.user is None:
            return None
        return self.user, _secret(self.password_file, PASSWORD_ENV,
                                  f"password of {self.user} at PACS {self.url}")


@dataclass(frozen=True)
class DimsePacs:
    """A DIMSE Query/Retrieve SCP (C-FIND + C-GET) and the AE titles of both ends."""

    host: str
    port: int
    aet: str  # ours, as registered at the PACS
    called_aet: str  # the PACS's

    @property
    def name(self) -> str:
        return f"{self.called_aet}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Cohort:
    """The studies to pull: listed (a UID file, the label manifest's StudyInstanceUIDs) and/or
    queried (modality, studies since a date). Both: the listed studies the query returns."""

    study_uids: tuple[str, ...] | None = None
    modality: str | None = None
    since: str | None = None  # YYYYMMDD

    @property
    def is_query(self) -> bool:
        return self.modality is not None or self.since is not None


@dataclass(frozen=True)
class PullSettings:
    pacs: DicomwebPacs | DimsePacs
    cohort: Cohort


def pull_settings(values: Mapping[str, object], *, base: Path, where: str,
                  labels: Path | None = None) -> PullSettings:
    """Settings from PACS_KEYS values (unset: None or absent); paths relative to `base`.

    `where` names the source in errors ("site.toml [pacs]", "site pull"); `labels` is a label
    manifest whose StudyInstanceUIDs join the cohort.
    """
    unknown = sorted(set(values) - set(PACS_KEYS))
    if unknown:
        raise PacsSettingsError(f"{where}: unknown key(s) {', '.join(unknown)}; the keys are "
                                f"{', '.join(PACS_KEYS)}")
    text = {key: _text(values, key, where) for key in PACS_KEYS}
    paths = {key: (base / value).resolve() if (value := text[key]) else None for key in _PATH_KEYS}
    return PullSettings(_pacs(text, paths, where), _cohort(text, paths["study-uids"], labels, where))


def _text(values: Mapping[str, object], key: str, where: str) -> str | None:
    value = values.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str | Path):
        raise PacsSettingsError(f"{where}: {key} must be a string, got {value!r}")
    return str(value).strip()


def _pacs(text: Mapping[str, str | None], paths: Mapping[str, Path | None],
          where: str) -> DicomwebPacs | DimsePacs:
    if (text["dicomweb"] is None) == (text["dimse"] is None):
        raise PacsSettingsError(f"{where}: name the PACS with exactly one of dicomweb (its "
                                "DICOMweb URL) or dimse (HOST:PORT)")
    if text["dicomweb"] is not None:
        url = text["dicomweb"].rstrip("/")
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise PacsSettingsError(f"{where}: dicomweb must be an http:// or https:// URL, "
                                    f"got {url!r}")
        if text["password-file"] and not text["user"]:
            raise PacsSettingsError(f"{where}: password-file needs user (the PACS account)")
        if text["token-file"] and text["user"]:
            raise PacsSettingsError(f"{where}: give user + password-file or token-file, not both")
        return DicomwebPacs(url, text["user"], paths["password-file"], paths["token-file"],
                            paths["ca-file"])
    host, _, port = str(text["dimse"]).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PacsSettingsError(f"{where}: dimse must be HOST:PORT, got {text['dimse']!r}")
    for key in ("aet", "called-aet"):
        if text[key] is None or not _AE_TITLE.fullmatch(text[key] or ""):
            raise PacsSettingsError(f"{where}: dimse needs {key}, an AE title of 1-16 printable "
                                    f"ASCII characters, got {text[key]!r} (ask the PACS "
                                    "administrator)")
    secrets = [k for k in ("user", "password-file", "token-file", "ca-file") if text[k]]
    if secrets:
        raise PacsSettingsError(f"{where}: {', '.join(secrets)} apply to dicomweb only: a DIMSE "
                                "PACS admits a site by its AE title and address")
    return DimsePacs(host.strip("[]"), int(port), str(text["aet"]), str(text["called-aet"]))


def _cohort(text: Mapping[str, str | None], uid_file: Path | None, labels: Path | None,
            where: str) -> Cohort:
    since = text["since"]
    if since is not None:
        try:
            datetime.strptime(since, "%Y%m%d")
        except ValueError:
            raise PacsSettingsError(f"{where}: since must be a date YYYYMMDD, got {since!r}") from None
    listed: list[str] = []
    if uid_file is not None:
        listed += _uid_file(uid_file)
    if labels is not None:
        listed += manifest_studies(labels)
    cohort = Cohort(tuple(dict.fromkeys(listed)) if uid_file or labels else None,
                    text["modality"], since)
    if cohort.study_uids is None and not cohort.is_query:
        raise PacsSettingsError(f"{where}: name the cohort (study-uids, labels, modality or "
                                "since): a pull never copies a whole PACS by accident")
    return cohort


def _uid_file(path: Path) -> list[str]:
    """One StudyInstanceUID a line; blank lines and #-comments ignored."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise PacsSettingsError(f"cannot read study list {path}: {err}") from None
    uids = [line.split("#", 1)[0].strip() for line in lines]
    bad = [(n, u) for n, u in enumerate(uids, start=1) if u and not is_uid(u)]
    if bad:
        raise PacsSettingsError(f"study list {path} line {bad[0][0]}: {bad[0][1]!r} is not a "
                                "DICOM UID (digits and dots)")
    return [u for u in uids if u]


def manifest_studies(path: Path) -> list[str]:
    """The label manifest's StudyInstanceUIDs (in file order, each once)."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise PacsSettingsError(f"cannot read labels file {path}: {err}") from None
    uids = [(row.get("StudyInstanceUID") or "").strip() for row in rows]
    if not any(uids):
        raise PacsSettingsError(f"labels file {path} has no StudyInstanceUID column values: the "
                                "cohort is pulled study by study (or pass --study-uids)")
    bad = next((u for u in uids if u and not is_uid(u)), None)
    if bad is not None:
        raise PacsSettingsError(f"labels file {path}: {bad!r} is not a DICOM UID")
    return list(dict.fromkeys(u for u in uids if u))


def _secret(path: Path | None, env: str, what: str) -> str:
    if path is not None:
        try:
            return read_secret(path, what).decode().strip()
        except (SecretFileError, UnicodeDecodeError) as err:
            raise PacsSettingsError(str(err)) from None
    value = os.environ.get(env)
    if not value:
        raise PacsSettingsError(f"no {what}: put it in a file only you can read (chmod 600) and "
                                f"name it (password-file / token-file), or set {env}")
    return value


def site_toml_pull(site_toml: Path, labels: Path | None) -> PullSettings | None:
    """site.toml's [pacs] section (None without one); `labels` is the site's label manifest,
    whose studies are the cohort as for `site pull --labels`."""
    try:
        table = tomllib.loads(site_toml.read_text()).get(PACS_SECTION)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise PacsSettingsError(f"cannot read {site_toml}: {err}") from None
    if table is None:
        return None
    if not isinstance(table, dict):
        raise PacsSettingsError(f"{site_toml}: [{PACS_SECTION}] must be a table")
    return pull_settings(table, base=site_toml.resolve().parent,
                         where=f"{site_toml} [{PACS_SECTION}]", labels=labels)
