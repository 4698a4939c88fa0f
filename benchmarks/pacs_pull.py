"""Pull throughput from a real Orthanc: instances/s and MB/s over DICOMweb and over DIMSE.

Starts Debian's Orthanc (the tests' launcher, tests/orthanc.py: authentication on, DICOMweb
plugin), uploads one synthetic hospital, then times `sites.pull.pull` into an empty folder:
DICOMweb (QIDO + WADO-RS, one request per series), DIMSE (C-FIND + C-GET with UID lists) as
shipped, and DIMSE with TCP_NODELAY only (TCP_QUICKACK off), the socket tuning's effect.
"""

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from orthanc import CLIENT_AET, ORTHANC_AET, PASSWORD, USER, running_orthanc  # tests/orthanc.py

import sites.pacs_dimse
from fedhealth.core.synth import synthesize_federation
from sites.pacs_settings import Cohort, DicomwebPacs, DimsePacs, PullSettings
from sites.pull import pull


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300, help="instances in the cohort")
    parser.add_argument("--image-size", type=int, default=256, help="synthesized rows = columns")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize_federation(root / "fed", 1, seed=1, images_per_site=args.images,
                              image_size=args.image_size)
        files = sorted((root / "fed").rglob("*.dcm"))
        (root / "password").write_text(PASSWORD)
        (root / "password").chmod(0o600)
        orthanc_up = running_orthanc(root / "orthanc", _free_port(), _free_port())
        orthanc = next(orthanc_up)
        try:
            orthanc.upload(files)
            cohort = Cohort(modality="DX")
            runs = {
                "dicomweb": PullSettings(DicomwebPacs(orthanc.dicomweb, USER, root / "password"),
                                         cohort),
                "dimse": PullSettings(DimsePacs("127.0.0.1", orthanc.dicom_port, CLIENT_AET,
                                                ORTHANC_AET), cohort)}
            figures = {}
            for name, settings in [*runs.items(), ("dimse, TCP_NODELAY only", runs["dimse"])]:
                quickack = sites.pacs_dimse._QUICKACK
                if "only" in name:
                    sites.pacs_dimse._QUICKACK = None
                start = time.perf_counter()
                result = pull(settings, root / name.replace(" ", "_").replace(",", ""))
                seconds = time.perf_counter() - start
                sites.pacs_dimse._QUICKACK = quickack
                figures[name] = {"instances": result.new, "MB": round(result.bytes / 1e6, 2),
                                 "seconds": round(seconds, 3),
                                 "instances_per_s": round(result.new / seconds, 1),
                                 "MB_per_s": round(result.bytes / 1e6 / seconds, 2)}
        finally:
            orthanc_up.close()
    print("| protocol | instances | MB | s | instances/s | MB/s |\n|---|---:|---:|---:|---:|---:|")
    for name, f in figures.items():
        print(f"| {name} | {f['instances']} | {f['MB']} | {f['seconds']} | "
              f"{f['instances_per_s']} | {f['MB_per_s']} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
