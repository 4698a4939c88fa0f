"""A real Orthanc PACS for tests: Debian's `orthanc` + `orthanc-dicomweb`, started per test module.

Orthanc 1.10 has no bind-address option: both its HTTP and DICOM ports listen on every
interface. It is locked down instead of hidden: HTTP answers localhost only
(`RemoteAccessAllowed: false`) and only with a password; DIMSE accepts no unknown AE
(`DicomAlwaysAllow*: false`) and our one AE only from 127.0.0.1 (`DicomCheckModalityHost`).
This keeps the test client in the test process (no network namespace to enter, no
subprocess per pull), which is what keeps these tests inside their time budget.
"""

import json
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "fedhealth", "orthanc-test-password"
ORTHANC_AET, CLIENT_AET = "ORTHANC", "FEDHEALTH"


def orthanc_available() -> bool:
    return Path(ORTHANC).is_file() and DICOMWEB_PLUGIN.is_file()


@dataclass(frozen=True)
class Orthanc:
    """One running Orthanc: where to reach it and how to fill it."""

    http_port: int
    dicom_port: int
    storage: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, files: Iterable[Path]) -> dict[Path, str]:
        """POST each file to /instances (Orthanc keeps the bytes as sent); returns each file's
        Orthanc instance id. Files Orthanc refuses are left out."""
        ids = {}
        with requests.Session() as session:
            session.auth = (USER, PASSWORD)
            for path in files:
                reply = session.post(f"{self.url}/instances", data=path.read_bytes(), timeout=30)
                if reply.ok:
                    ids[path] = reply.json()["ID"]
        return ids

    def stored_file(self, instance_id: str) -> bytes:
        """The file exactly as Orthanc stores it."""
        reply = requests.get(f"{self.url}/instances/{instance_id}/file", auth=(USER, PASSWORD),
                             timeout=30)
        reply.raise_for_status()
        return reply.content


def orthanc_config(http_port: int, dicom_port: int, storage: Path) -> dict[str, object]:
    return {
        "Name": "fedhealth-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "DicomCheckCalledAet": True, "DicomCheckModalityHost": True,
        # the calling AE's own port: Orthanc needs one, C-GET answers on the same association
        "DicomModalities": {"fedhealth": [CLIENT_AET, "127.0.0.1", 104]},
        **{f"DicomAlwaysAllow{op}": False for op in ("Echo", "Store", "Find", "Get", "Move",
                                                      "FindWorklist")},
        "StorageCompression": False, "HttpCompressionEnabled": False,
        "StableAge": 1, "DicomThreadsCount": 2, "ConcurrentJobs": 1,
    }


def start_orthanc(root: Path, http_port: int, dicom_port: int) -> tuple[Orthanc, subprocess.Popen]:
    """Start Orthanc on the given ports and wait until its REST API answers."""
    storage = root / "db"
    storage.mkdir(parents=True)
    config = root / "orthanc.json"
    config.write_text(json.dumps(orthanc_config(http_port, dicom_port, storage)))
    log = (root / "orthanc.log").open("wb")
    process = subprocess.Popen([ORTHANC, str(config)], stdout=log, stderr=subprocess.STDOUT)
    orthanc = Orthanc(http_port, dicom_port, storage)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {process.returncode}: "
                               f"{(root / 'orthanc.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{orthanc.url}/system", auth=(USER, PASSWORD), timeout=1).ok:
                return orthanc, process
        except requests.ConnectionError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"Orthanc did not answer on {orthanc.url} within 20 s")


def running_orthanc(root: Path, http_port: int, dicom_port: int) -> Iterator[Orthanc]:
    """Generator for a pytest fixture: Orthanc for the fixture's scope, stopped after."""
    orthanc, process = start_orthanc(root, http_port, dicom_port)
    try:
        yield orthanc
    finally:
        process.kill()  # its storage is the test's temporary folder: nothing to shut down cleanly
        process.wait()
