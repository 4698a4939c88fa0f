"""Pull from a DICOMweb PACS: QIDO-RS (dicomweb-client) lists, WADO-RS streams the stored bytes.

`transfer-syntax=*` in every Accept header: without it a PACS transcodes (Orthanc to Explicit
VR Little Endian), so files would not be the stored ones, and a study it cannot transcode
(JPEG 2000 on Orthanc) fails whole with HTTP 500. A series the site lacks entirely comes in one
request; single missing instances one request each. TLS is verified against the system trust
store or the given CA file, never switched off.
"""

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import requests
from dicomweb_client import DICOMwebClient

from sites.pacs_client import OnInstance, PacsError, check_listed, missing_named
from sites.pacs_multipart import MultipartError, boundary_of, split_parts
from sites.pacs_settings import TOKEN_ENV, Cohort, DicomwebPacs, PacsSettingsError
from sites.pacs_store import InstanceRef, InstanceStore, MalformedInstance

if TYPE_CHECKING:
    from requests.sessions import _Settings

ACCEPT_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_CHUNK = 1 << 20
_TIMEOUT = (10, 120)  # seconds to connect, and between two bytes of a reply
_PAGE = 1000  # QIDO-RS results per request
_STUDIES_PER_SEARCH = 50  # StudyInstanceUIDs per search (a URL of about 3 kB)
_TAG = {"study": "0020000D", "series": "0020000E", "sop": "00080018", "sop_class": "00080016"}


class DicomwebClient:
    """One PACS session (keep-alive, credentials read once); use as a context manager."""

    def __init__(self, pacs: DicomwebPacs) -> None:
        self.name = pacs.url
        self._pacs = pacs
        self._session = _PacsSession()
        try:
            auth = pacs.auth()
        except PacsSettingsError as err:
            raise PacsError(self.name, str(err)) from None
        if isinstance(auth, tuple):
            self._session.auth = auth
        elif auth is not None:
            self._session.headers["Authorization"] = f"Bearer {auth}"
        self._session.verify = str(pacs.ca_file) if pacs.ca_file else True
        self._qido = DICOMwebClient(pacs.url, session=self._session)
        self._qido.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=200)

    def __enter__(self) -> "DicomwebClient":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._session.close()

    def find_studies(self, cohort: Cohort) -> list[str]:
        filters = {"ModalitiesInStudy": cohort.modality,
                   "StudyDate": f"{cohort.since}-" if cohort.since else None}
        with self._errors(None):
            found = self._all_pages(self._qido.search_for_studies, None,
                                    search_filters={k: v for k, v in filters.items() if v})
            return list(dict.fromkeys(_value(item, _TAG["study"]) for item in found))

    def list_instances(self, studies: Sequence[str]) -> dict[str, list[InstanceRef]]:
        """One QIDO-RS search per batch of studies (UID list matching, PS3.18 8.3.4.1)."""
        listing: dict[str, list[InstanceRef]] = {study: [] for study in studies}
        for start in range(0, len(studies), _STUDIES_PER_SEARCH):
            batch = list(studies[start:start + _STUDIES_PER_SEARCH])
            study = batch[0] + (f" (and {len(batch) - 1} more)" if len(batch) > 1 else "")
            with self._errors(study):
                found = self._all_pages(
                    self._qido.search_for_instances, study,
                    search_filters={"StudyInstanceUID": ",".join(batch)},
                    fields=[_TAG["sop_class"]])
                for item in found:
                    ref = InstanceRef(**{name: _value(item, tag) for name, tag in _TAG.items()})
                    if ref.study in listing and ref not in listing[ref.study]:
                        listing[ref.study].append(ref)
        return check_listed(self.name, studies, listing)

    def _all_pages(self, search: Callable[..., list[dict]], study: str | None,
                   **query: object) -> list[dict]:
        """Every result of a QIDO-RS search, page by page (`limit`, `offset`).

        Not dicomweb-client's `get_remaining`: it repeats until a page is empty, which never
        happens on a server that ignores `offset` (Orthanc's DICOMweb 1.7 does on study searches).
        """
        found: list[dict] = []
        seen: set[str] = set()
        while True:
            page = search(limit=_PAGE, offset=len(found), **query)
            new = [item for item in page if json.dumps(item, sort_keys=True) not in seen]
            seen.update(json.dumps(item, sort_keys=True) for item in new)
            found += new
            if len(page) < _PAGE:
                return found
            if not new:
                raise PacsError(self.name, f"the PACS ignores the QIDO-RS offset, so no more than "
                                           f"{_PAGE} results can be listed; name the cohort with a "
                                           "study list (--study-uids or --labels)", study)

    def fetch(self, missing: Sequence[InstanceRef], whole_series: frozenset[str],
              store: InstanceStore, on_instance: OnInstance) -> None:
        requests_: dict[str, list[InstanceRef]] = {}
        for ref in missing:
            key = (f"studies/{ref.study}/series/{ref.series}" if ref.series in whole_series else
                   f"studies/{ref.study}/series/{ref.series}/instances/{ref.sop}")
            requests_.setdefault(key, []).append(ref)
        got: set[str] = set()
        for path, wanted in requests_.items():
            with self._errors(wanted[0].study):
                got |= self._get(path, {ref.sop: ref for ref in wanted}, store, on_instance)
        for study in dict.fromkeys(ref.study for ref in missing):  # after all: the rest is kept
            missing_named(self.name, study, [r for r in missing if r.study == study], got)

    def _get(self, path: str, expected: dict[str, InstanceRef], store: InstanceStore,
             on_instance: OnInstance) -> set[str]:
        got: set[str] = set()
        with self._session.get(f"{self._pacs.url}/{path}", headers={"Accept": ACCEPT_STORED},
                               stream=True, timeout=_TIMEOUT) as reply:
            if reply.status_code == 404:
                return got  # named by missing_named
            reply.raise_for_status()
            boundary = boundary_of(reply.headers.get("Content-Type", ""))
            parts = split_parts(reply.iter_content(_CHUNK), boundary, store.incoming)
            for part in parts:
                ref = part.commit(expected)
                got.add(ref.sop)
                on_instance(part.size)
        return got

    @contextmanager
    def _errors(self, study: str | None) -> Iterator[None]:
        """Every way a request can fail, as one PacsError line naming PACS and study."""
        try:
            yield
        except requests.exceptions.SSLError as err:
            raise PacsError(self.name, f"TLS certificate not verified ({_reason(err)}); give the "
                                       "PACS's CA certificate with --ca-file (ca-file)", study) from None
        except requests.exceptions.ConnectionError as err:
            raise PacsError(self.name, f"unreachable ({_reason(err)}); check the URL and the "
                                       "firewall", study) from None
        except requests.exceptions.Timeout:
            raise PacsError(self.name, f"no answer within {_TIMEOUT[1]} s", study) from None
        except requests.exceptions.HTTPError as err:
            raise PacsError(self.name, _http_reason(err, self._pacs), study) from None
        except requests.exceptions.ChunkedEncodingError:
            raise PacsError(self.name, "malformed reply: cut off mid-way (the connection closed "
                                       "early); run the pull again", study) from None
        except (MultipartError, MalformedInstance) as err:
            raise PacsError(self.name, f"malformed reply: {err}", study) from None
        except (ValueError, KeyError, TypeError, IndexError) as err:  # QIDO JSON not as specified
            raise PacsError(self.name, f"malformed QIDO-RS reply ({type(err).__name__}: {err})",
                            study) from None


class _PacsSession(requests.Session):
    """A session whose CA file wins: plain requests lets REQUESTS_CA_BUNDLE (or CURL_CA_BUNDLE)
    replace a session's `verify`, so --ca-file would be silently ignored where they are set."""

    def merge_environment_settings(self, url: str | bytes | None, proxies: Any, stream: Any,
                                   verify: Any, cert: Any) -> "_Settings":
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if self.verify is not True and verify in (None, True):
            settings["verify"] = self.verify
        return settings


def _value(item: dict, tag: str) -> str:
    """The one string value of `tag` in a DICOM JSON object (KeyError if absent)."""
    values = item.get(tag, {}).get("Value") or [""]
    if tag != _TAG["sop_class"] and not values[0]:
        raise KeyError(f"no {tag} in a QIDO-RS result")
    return str(values[0])


def _http_reason(err: requests.exceptions.HTTPError, pacs: DicomwebPacs) -> str:
    code = err.response.status_code if err.response is not None else 0
    if code == 401:
        if pacs.user is None and pacs.token_file is None and not os.environ.get(TOKEN_ENV):
            return "the PACS needs a login (HTTP 401): give --user and --password-file, or a token"
        who = f"user {pacs.user}" if pacs.user else "the token"
        return (f"login refused (HTTP 401) for {who}: check the account and its password or "
                "token file")
    if code == 403:
        return "the account may not read this (HTTP 403): ask the PACS administrator for access"
    reason = err.response.reason if err.response is not None else str(err)
    return f"HTTP {code} {reason}"


def _reason(err: Exception) -> str:
    """The innermost cause of a requests error (refused, name not known, certificate...)."""
    cause: BaseException = err
    while cause.__context__ is not None:
        cause = cause.__context__
    return str(getattr(cause, "strerror", None) or cause)[:200]
