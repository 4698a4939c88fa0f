"""A real Orthanc PACS for tests: Debian's `orthanc` + `orthanc-dicomweb`, started per test module.

Orthanc 1.10 has no bind-address option: both its HTTP and DICOM ports listen on every
interface. It is locked down instead of hidden: HTTP answers localhost only
(`RemoteAccessAllowed: false`) and only with a password; DIMSE accepts no unknown AE
(`DicomAlwaysAllow*: false`) and our one AE only from 127.0.0.1 (`DicomCheckModalityHost`).
This keeps the test client in the test process (no network namespace to enter, no
subprocess per pull), which is what keeps these tests inside their time budget.

Also what the tests that pull from it share: the pull's options for this Orthanc, and how a
pulled folder is compared with what was uploaded (tests/test_pacs_pull.py,
tests/test_bundle_export.py).
"""

import contextlib
import io
import json
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.tag import Tag

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "fedhealth", "orthanc-test-password"
ORTHANC_AET, CLIENT_AET = "ORTHANC", "FEDHEALTH"


PIXEL_DATA, PADDING = Tag(0x7FE0, 0x0010), Tag(0xFFFC, 0xFFFC)


def skip_without_orthanc() -> None:
    """Skip the calling test or fixture where Debian's Orthanc is not installed."""
    if not (Path(ORTHANC).is_file() and DICOMWEB_PLUGIN.is_file()):
        pytest.skip("needs Debian's orthanc and orthanc-dicomweb (.ci/run installs them)")


def write_password_file(folder: Path) -> Path:
    """The account's password as `site pull` wants it: a file only its owner can read."""
    path = folder / "pacs.password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


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

    def dicomweb_options(self, password_file: Path) -> list[str]:
        """`site pull` options for this Orthanc over DICOMweb, logged in."""
        return ["--dicomweb", self.dicomweb, "--user", USER, "--password-file", str(password_file)]

    def dimse_options(self) -> list[str]:
        """`site pull` options for this Orthanc over DIMSE, as the AE it knows."""
        return ["--dimse", f"127.0.0.1:{self.dicom_port}", "--aet", CLIENT_AET,
                "--called-aet", ORTHANC_AET]

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


@contextlib.contextmanager
def running_orthanc(root: Path, http_port: int, dicom_port: int) -> Iterator[Orthanc]:
    """Orthanc for the `with` block, stopped after."""
    orthanc, process = start_orthanc(root, http_port, dicom_port)
    try:
        yield orthanc
    finally:
        process.kill()  # its storage is the test's temporary folder: nothing to shut down cleanly
        process.wait()


# ---------------------------------------------------------------- comparing pulled folders

def pulled_files(folder: Path) -> dict[str, Path]:
    """SOPInstanceUID -> file of a pulled folder (the pull names each file by it)."""
    return {p.stem: p for p in folder.rglob("*.dcm")}


def by_sop_uid(files: Iterable[Path]) -> dict[str, bytes]:
    """SOPInstanceUID -> bytes of files named otherwise (a hospital's own export)."""
    return {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID): path.read_bytes()
            for path in files}


def same_instance(pulled: bytes, stored: bytes) -> bool:
    """Same transfer syntax, same pixel data bytes (nothing transcoded) and the same element
    values. Not the same bytes: DCMTK (Orthanc's toolkit) re-serializes a data set it sends
    over DIMSE (group lengths and trailing padding dropped, VRs fixed, deflate redone)."""
    a, b = (pydicom.dcmread(io.BytesIO(data)) for data in (pulled, stored))
    if a.file_meta.TransferSyntaxUID != b.file_meta.TransferSyntaxUID:
        return False
    if a.get("PixelData") is not None and a.PixelData != b.PixelData:
        return False
    for ds in (a, b):
        for tag in [t for t in list(ds.keys()) if t.element == 0 or t in (PIXEL_DATA, PADDING)]:
            del ds[tag]
    return a == b


def comparable(report: object) -> dict[str, object]:
    """A site check report without what names the folder."""
    fields = dict(vars(report))
    for key in ("site", "path", "labels_file", "skipped"):
        fields.pop(key)
    fields["skipped"] = sorted(s["reason"] for s in vars(report)["skipped"])
    return fields
