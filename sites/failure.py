"""What a site sends when a train, evaluate or query call fails: a category and a reference only.

An exception's text names local paths, file names and counts (a SiteDataError lists the site's
skip reasons), and Flower would put it verbatim into the error reply the aggregator reads. Here
the aggregator gets a short category ("site-data") and a random reference; the full detail, with
the traceback, is written under that reference to the site's own error log, where the site's IT
finds it.
"""

import json
import logging
import os
import secrets
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from fedhealth.core.config import ConfigError
from fedhealth.core.crypto.keyfile import KeyFileError
from fedhealth.core.crypto.messages import InstructionError
from fedhealth.core.crypto.presets import HeadroomError
from sites.data_limits import DataLimitsError
from sites.dicom_files import SiteDataError
from sites.personal_store import PersonalStoreError
from sites.privacy_budget import PrivacyBudgetExceeded
from sites.site_settings import SiteSettingsError

# First match wins; anything else is "internal". Categories name a kind of problem, never a value.
_CATEGORIES: tuple[tuple[type[Exception], str], ...] = (
    (SiteDataError, "site-data"),
    (SiteSettingsError, "site-settings"),
    (DataLimitsError, "site-settings"),
    (KeyFileError, "site-key"),
    (PersonalStoreError, "site-state"),
    (InstructionError, "instruction"),
    (ConfigError, "instruction"),
    (HeadroomError, "crypto"),
    (PrivacyBudgetExceeded, "privacy-budget"),
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteFailure:
    """A failure as the aggregator may see it."""

    category: str
    reference: str

    @property
    def reason(self) -> str:
        """The error reply's text: no path, file name, count or exception message."""
        return f"{self.category} error at the site; reference {self.reference} in the site's error log"


def category_of(err: BaseException) -> str:
    return next((name for kind, name in _CATEGORIES if isinstance(err, kind)), "internal")


def record_failure(err: Exception, error_log: Path | None, *, kind: str, run_id: int,
                   server_round: int | None) -> SiteFailure:
    """Write the detail of `err` to the site's error log (JSON lines) and return what may leave.

    The process log (which a SuperNode may show beyond the site) gets only the category and the
    reference, unless there is no error log to write (the node config did not say where the
    site's state is, or it cannot be written): then the detail goes to the process log.
    """
    failure = SiteFailure(category_of(err), secrets.token_hex(6))
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reference": failure.reference,
             "kind": kind, "run": int(run_id), "round": server_round,
             "category": failure.category, "error": type(err).__name__, "detail": str(err),
             "traceback": traceback.format_exception(err)}
    if error_log is not None:
        try:
            error_log.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(error_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, (json.dumps(entry) + "\n").encode())
            finally:
                os.close(fd)
            log.error("%s failed (%s, reference %s): detail in %s", kind, failure.category,
                      failure.reference, error_log)
            return failure
        except OSError as log_err:  # the reply must still leave; the process log gets the detail
            log.error("cannot write the site's error log %s: %s", error_log, log_err)
    log.error("%s failed (%s, reference %s): %s", kind, failure.category, failure.reference, err,
              exc_info=err)
    return failure
