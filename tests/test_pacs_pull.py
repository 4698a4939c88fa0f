"""`fedhealth site pull` against a real Orthanc (DICOMweb plugin, authentication on, DIMSE).

The PACS holds a small synthetic hospital and pydicom files in eight transfer syntaxes
(uncompressed little and big endian, deflated, JPEG baseline, JPEG 2000 lossless and lossy, an
SR without pixels). Pulled files are compared with what Orthanc stores, byte for byte.
"""

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom
import pytest
import requests
from orthanc import (
    CLIENT_AET,
    ORTHANC_AET,
    PASSWORD,
    USER,
    Orthanc,
    comparable,
    pulled_files,
    running_orthanc,
    same_instance,
    skip_without_orthanc,
    write_password_file,
)
from typer.testing import CliRunner

from fedhealth.app.cli import app
from fedhealth.app.deployment import pki
from fedhealth.core.synth import synthesize_federation
from sites.audit import AuditLog
from sites.pacs_client import PacsError
from sites.pacs_multipart import MultipartError, split_parts
from sites.pacs_settings import (
    Cohort,
    DicomwebPacs,
    DimsePacs,
    PacsSettingsError,
    PullSettings,
    pull_settings,
    site_toml_pull,
)
from sites.pacs_store import PARTIAL_SUFFIX, InstanceStore
from sites.pull import open_client, pull
from sites.site_check import check_site

pytestmark = pytest.mark.slow

PYDICOM_FILES = ("CT_small.dcm", "ExplVR_BigEnd.dcm", "image_dfl.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                 "GDCMJ2K_TextGBR.dcm", "693_J2KI.dcm", "SC_rgb_gdcm_KY.dcm", "test-SR.dcm")
SYNTH_IMAGES = 12


# ---------------------------------------------------------------- the PACS and what it holds

@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory,
            free_port: Callable[[], int]) -> Iterator[Orthanc]:
    skip_without_orthanc()
    with running_orthanc(tmp_path_factory.mktemp("orthanc"), free_port(), free_port()) as running:
        yield running


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc) -> Path:
    """The uploaded folder: one synthetic hospital (labels.csv at its top) + pydicom files."""
    root = tmp_path_factory.mktemp("upload")
    synthesize_federation(root, 1, seed=5, images_per_site=SYNTH_IMAGES)
    site = root / "hospital-1"
    corpus = Path(pydicom.__file__).parent / "data" / "test_files"
    (site / "pydicom").mkdir()
    for name in PYDICOM_FILES:
        shutil.copy(corpus / name, site / "pydicom" / name)
    files = sorted(p for p in site.rglob("*.dcm"))
    assert len(orthanc.upload(files)) == len(files)
    return site


@pytest.fixture(scope="module")
def stored(orthanc: Orthanc, hospital: Path) -> dict[str, bytes]:
    """SOPInstanceUID -> the file exactly as Orthanc stores it."""
    ids = orthanc.upload(sorted(hospital.rglob("*.dcm")))  # already there: Orthanc answers the ids
    return {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID):
            orthanc.stored_file(oid) for path, oid in ids.items()}


@pytest.fixture(scope="module")
def study_list(tmp_path_factory: pytest.TempPathFactory, hospital: Path) -> Path:
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
            for p in hospital.rglob("*.dcm")}
    path = tmp_path_factory.mktemp("cohort") / "studies.txt"
    path.write_text("# the test cohort\n" + "\n".join(sorted(uids)) + "\n")
    return path


@pytest.fixture(scope="module")
def password_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_password_file(tmp_path_factory.mktemp("secrets"))


def dicomweb(orthanc: Orthanc, password_file: Path, study_list: Path, **changes: object) -> PullSettings:
    values = {"dicomweb": orthanc.dicomweb, "user": USER, "password-file": password_file,
              "study-uids": study_list, **changes}
    return pull_settings(values, base=Path.cwd(), where="test")


def dimse(orthanc: Orthanc, study_list: Path, **changes: object) -> PullSettings:
    values = {"dimse": f"127.0.0.1:{orthanc.dicom_port}", "aet": CLIENT_AET,
              "called-aet": ORTHANC_AET, "study-uids": study_list, **changes}
    return pull_settings(values, base=Path.cwd(), where="test")


# ---------------------------------------------------------------- DICOMweb

def test_dicomweb_pull_is_bit_exact_resumes_with_nothing_new_and_checks_like_the_upload(
        tmp_path: Path, orthanc: Orthanc, hospital: Path, stored: dict[str, bytes],
        password_file: Path, study_list: Path) -> None:
    out, audit = tmp_path / "site", tmp_path / "audit.jsonl"
    settings = dicomweb(orthanc, password_file, study_list)

    first = pull(settings, out, audit_log=audit)
    files = pulled_files(out)
    assert first.new == len(stored) == len(files) == SYNTH_IMAGES + len(PYDICOM_FILES)
    assert {sop: path.read_bytes() for sop, path in files.items()} == stored
    labels = hospital / "labels.csv"
    assert comparable(check_site(out, labels)) == comparable(check_site(hospital, labels))

    second = pull(settings, out, audit_log=audit)
    assert (second.new, second.bytes, second.present) == (0, 0, len(stored))
    lines = AuditLog(audit).entries()
    assert [(e["kind"], e["instances"], e["error"]) for e in lines] == [
        ("pacs-pull", len(stored), None), ("pacs-pull", 0, None)]
    assert lines[0]["bytes"] == sum(map(len, stored.values()))
    text = audit.read_text()
    assert "SYNTH^" not in text and "H1P0" not in text  # no patient name or id
    assert not any(uid in text for uid in study_list.read_text().split() if uid[0].isdigit())


def test_the_command_says_how_many_instances_were_new_and_reports_the_site_check(
        tmp_path: Path, orthanc: Orthanc, hospital: Path, password_file: Path) -> None:
    out = tmp_path / "site"
    argv = ["site", "pull", "--out", str(out), *orthanc.dicomweb_options(password_file),
            "--labels", str(hospital / "labels.csv")]
    first = CliRunner().invoke(app, argv)
    assert first.exit_code == 0, first.output
    assert f"{SYNTH_IMAGES} new instances" in first.output
    assert "site check" in first.output and str(SYNTH_IMAGES) in first.output
    second = CliRunner().invoke(app, argv)
    assert second.exit_code == 0, second.output
    assert "0 new instances" in second.output
    assert (tmp_path / "site.audit.jsonl").is_file()


def test_a_pull_killed_mid_way_leaves_no_corrupt_file_and_a_restart_completes(
        tmp_path: Path, orthanc: Orthanc, stored: dict[str, bytes], password_file: Path,
        study_list: Path) -> None:
    out = tmp_path / "site"
    with StallingProxy(orthanc.http_port, stall_after=sum(map(len, stored.values())) // 2) as proxy:
        command = [str(Path(sys.executable).with_name("fedhealth")), "site", "pull", "--out",
                   str(out), "--dicomweb", f"http://127.0.0.1:{proxy.port}/dicom-web", "--user",
                   USER, "--password-file", str(password_file), "--study-uids", str(study_list)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert proxy.stalled.wait(60), "the pull never got half-way"
            time.sleep(0.3)  # the pull is now blocked inside a reply
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
    halfway = pulled_files(out)
    assert 0 < len(halfway) < len(stored)
    assert all(path.read_bytes() == stored[sop] for sop, path in halfway.items())

    done = pull(dicomweb(orthanc, password_file, study_list), out)
    assert (done.new, done.present) == (len(stored) - len(halfway), len(halfway))
    assert {sop: path.read_bytes() for sop, path in pulled_files(out).items()} == stored
    assert not [p for p in out.rglob("*") if p.name.endswith(PARTIAL_SUFFIX)]


def test_a_wrong_password_fails_in_one_line_naming_the_pacs(
        tmp_path: Path, orthanc: Orthanc, password_file: Path, study_list: Path) -> None:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password")
    wrong.chmod(0o600)
    result = CliRunner().invoke(app, [
        "site", "pull", "--out", str(tmp_path / "site"), "--dicomweb", orthanc.dicomweb,
        "--user", USER, "--password-file", str(wrong), "--study-uids", str(study_list)])
    assert result.exit_code == 1
    (line,) = [x for x in result.output.splitlines() if x.strip()]
    assert line.startswith(f"error: PACS {orthanc.dicomweb}: ") and "HTTP 401" in line
    assert not pulled_files(tmp_path / "site")


def test_a_password_file_others_can_read_is_refused_before_connecting(
        tmp_path: Path, orthanc: Orthanc, study_list: Path) -> None:
    readable = tmp_path / "pacs.password"
    readable.write_text(PASSWORD)
    readable.chmod(0o644)
    with pytest.raises(PacsError, match=r"permissions 0644.*chmod 600"):
        pull(dicomweb(orthanc, readable, study_list), tmp_path / "site")


def test_the_password_may_come_from_the_environment(
        tmp_path: Path, orthanc: Orthanc, study_list: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDHEALTH_PACS_PASSWORD", PASSWORD)
    settings = dicomweb(orthanc, None, study_list)  # type: ignore[arg-type]
    assert pull(settings, tmp_path / "site").new > 0


def test_a_missing_study_stops_the_pull_before_anything_is_transferred(
        tmp_path: Path, orthanc: Orthanc, password_file: Path, study_list: Path) -> None:
    absent = "1.2.3.4.5.6.7.8.9"
    listed = tmp_path / "studies.txt"
    listed.write_text(study_list.read_text() + absent + "\n")
    for settings in (dicomweb(orthanc, password_file, listed), dimse(orthanc, listed)):
        with pytest.raises(PacsError, match=rf"^PACS .*: study {absent}: not on the PACS") as err:
            pull(settings, tmp_path / "site")
        assert err.value.study == absent
        assert not pulled_files(tmp_path / "site")


def test_an_unreachable_pacs_and_a_truncated_reply_fail_clearly(
        tmp_path: Path, orthanc: Orthanc, password_file: Path, study_list: Path,
        free_port: Callable[[], int]) -> None:
    nobody = free_port()
    with pytest.raises(PacsError, match=r"unreachable .*check the URL and the firewall"):
        pull(dicomweb(orthanc, password_file, study_list, dicomweb=f"http://127.0.0.1:{nobody}"),
             tmp_path / "a")
    with pytest.raises(PacsError, match=r"unreachable"):
        pull(replace(dimse(orthanc, study_list), pacs=DimsePacs("127.0.0.1", nobody, CLIENT_AET,
                                                                ORTHANC_AET)), tmp_path / "b")
    with StallingProxy(orthanc.http_port, stall_after=3000, cut=True) as proxy, \
            pytest.raises(PacsError, match=r"study [0-9.]+ \(and [0-9]+ more\): malformed reply: cut off"):
        pull(dicomweb(orthanc, password_file, study_list,
                      dicomweb=f"http://127.0.0.1:{proxy.port}/dicom-web"), tmp_path / "c")
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.endswith(PARTIAL_SUFFIX)]


def test_tls_is_verified_against_the_system_store_or_the_ca_file(
        tmp_path: Path, orthanc: Orthanc, hospital: Path, password_file: Path) -> None:
    """Orthanc 1.10's own HTTPS crashes here (SIGSEGV on the first request), so TLS is
    terminated in front of it, with a certificate from the federation's own CA code."""
    ca_key, ca_cert = pki.make_ca("pacs test")
    key, cert = pki.make_server_cert(ca_key, ca_cert, "127.0.0.1")
    (tmp_path / "server.pem").write_bytes(pki.cert_pem(cert) + pki.key_pem(key))
    (tmp_path / "ca.pem").write_bytes(pki.cert_pem(ca_cert))
    values = {"user": USER, "password-file": password_file, "modality": "DX"}
    with TlsFront(orthanc, tmp_path / "server.pem") as port:
        url = f"https://127.0.0.1:{port}/dicom-web"
        with pytest.raises(PacsError, match=r"TLS certificate not verified .*--ca-file"):
            pull(pull_settings({**values, "dicomweb": url}, base=tmp_path, where="test"),
                 tmp_path / "a")
        trusted = pull_settings({**values, "dicomweb": url, "ca-file": "ca.pem"}, base=tmp_path,
                                where="test")
        assert pull(trusted, tmp_path / "b").new == SYNTH_IMAGES  # over verified TLS


def test_site_start_pulls_the_pacs_section_before_it_checks_anything_else(
        tmp_path: Path, orthanc: Orthanc, hospital: Path, password_file: Path) -> None:
    shutil.copy(hospital / "labels.csv", tmp_path / "labels.csv")
    shutil.copy(password_file, tmp_path / "pacs.password")
    (tmp_path / "site.toml").write_text(
        '[site]\nname = "hosp-a"\ndata-dir = "data"\nlabels = "labels.csv"\n'
        'state-dir = "state"\naudit-log = "audit.jsonl"\n'
        '[superlink]\naddress = "127.0.0.1:9"\nca-cert = "ca.pem"\n'
        '[keys]\nnode-private-key = "node.key"\nkey-file = "site.ctx"\n'
        f'[pacs]\ndicomweb = "{orthanc.dicomweb}"\nuser = "{USER}"\n'
        'password-file = "pacs.password"\n')
    result = CliRunner().invoke(app, ["site", "start", "--config", str(tmp_path / "site.toml")])
    assert result.exit_code == 2  # no bundle here: the certificate check after the pull stops it
    assert f"{SYNTH_IMAGES} new instances" in result.output and "ca.pem" in result.output
    assert len(pulled_files(tmp_path / "data")) == SYNTH_IMAGES  # the labels' cohort
    (line,) = AuditLog(tmp_path / "audit.jsonl").entries()
    assert (line["kind"], line["instances"]) == ("pacs-pull", SYNTH_IMAGES)


# ---------------------------------------------------------------- DIMSE

def test_dimse_pull_keeps_the_stored_syntax_pixels_and_values_and_resumes_with_nothing_new(
        tmp_path: Path, orthanc: Orthanc, hospital: Path, stored: dict[str, bytes],
        study_list: Path) -> None:
    out = tmp_path / "site"
    first = pull(dimse(orthanc, study_list), out)
    files = pulled_files(out)
    assert first.new == len(files) == len(stored)
    assert [path.name for sop, path in files.items()
            if not same_instance(path.read_bytes(), stored[sop])] == []
    labels = hospital / "labels.csv"
    assert comparable(check_site(out, labels)) == comparable(check_site(hospital, labels))
    assert pull(dimse(orthanc, study_list), out).new == 0


def test_dimse_names_an_ae_title_the_pacs_does_not_know(
        tmp_path: Path, orthanc: Orthanc, study_list: Path) -> None:
    settings = dimse(orthanc, study_list)
    stranger = replace(settings, pacs=replace(settings.pacs, aet="STRANGER"))
    with pytest.raises(PacsError, match=r"association rejected: is AE title STRANGER registered"):
        pull(stranger, tmp_path / "site")


def test_dimse_pulls_a_cohort_queried_by_modality_and_date(
        tmp_path: Path, orthanc: Orthanc) -> None:
    settings = PullSettings(DimsePacs("127.0.0.1", orthanc.dicom_port, CLIENT_AET, ORTHANC_AET),
                            Cohort(modality="DX", since="20000101"))
    assert pull(settings, tmp_path / "site").new == SYNTH_IMAGES


def test_instances_the_pacs_does_not_send_are_named_and_the_others_kept(
        tmp_path: Path, orthanc: Orthanc, password_file: Path, study_list: Path) -> None:
    """An instance listed, then gone from the PACS before its turn (deleted meanwhile)."""
    for n, settings in enumerate((dicomweb(orthanc, password_file, study_list),
                                  dimse(orthanc, study_list))):
        store = InstanceStore(tmp_path / str(n))
        with open_client(settings) as client:
            study = settings.cohort.study_uids[0]  # type: ignore[index]
            real = client.list_instances([study])[study][0]
            gone = replace(real, sop="1.2.3.4.5.6.7.8.9.10")
            with pytest.raises(PacsError, match=rf"study {study}: 1 of 2 instances were not "
                                                rf"sent( \(C-GET status 0x[0-9A-F]+\))?: {gone.sop};"):
                client.fetch([real, gone], frozenset(), store, lambda size: None)
        assert store.has(real) and not store.has(gone)
        with pytest.raises(PacsError, match=r"another pull is writing into"):  # one at a time
            pull(settings, store.root)
        store.close()


# ---------------------------------------------------------------- settings and parts

def test_settings_refuse_what_would_pull_the_wrong_thing(tmp_path: Path) -> None:
    url = "https://pacs.example.org/dicom-web"
    cases = [({"dicomweb": url}, "name the cohort"),
             ({"dicomweb": url, "dimse": "h:104", "modality": "CT"}, "exactly one of"),
             ({"dimse": "pacs:104", "aet": "A", "modality": "CT"}, "called-aet"),
             ({"dimse": "pacs:104", "aet": "A", "called-aet": "B", "user": "u", "modality": "CT"},
              "dicomweb only"),
             ({"dicomweb": url, "since": "2020-01-01"}, "YYYYMMDD"),
             ({"dicomweb": url, "password": "x", "modality": "CT"}, "unknown key"),
             ({"dicomweb": url, "password-file": "p", "modality": "CT"}, "needs user")]
    for values, message in cases:
        with pytest.raises(PacsSettingsError, match=message):
            pull_settings(values, base=tmp_path, where="site.toml [pacs]")
    bad = tmp_path / "studies.txt"
    bad.write_text("1.2.3\n../../etc\n")
    with pytest.raises(PacsSettingsError, match=r"line 2: '../../etc' is not a DICOM UID"):
        pull_settings({"dicomweb": url, "study-uids": str(bad)}, base=tmp_path, where="x")


def test_site_toml_pacs_section_reads_like_the_command_line(tmp_path: Path, hospital: Path) -> None:
    toml = tmp_path / "site.toml"
    toml.write_text('[site]\nname = "a"\n\n[pacs]\ndicomweb = "https://pacs.example.org/dicom-web/"\n'
                    'user = "fedhealth"\npassword-file = "pacs.password"\nca-file = "pacs-ca.pem"\n')
    settings = site_toml_pull(toml, hospital / "labels.csv")
    assert settings is not None
    assert settings.pacs == DicomwebPacs("https://pacs.example.org/dicom-web", "fedhealth",
                                         tmp_path / "pacs.password", None, tmp_path / "pacs-ca.pem")
    assert settings.cohort.study_uids is not None and len(settings.cohort.study_uids) == SYNTH_IMAGES
    toml.write_text('[site]\nname = "a"\n')
    assert site_toml_pull(toml, None) is None


class _Sink:
    def __init__(self) -> None:
        self.data, self.discarded = bytearray(), False

    def write(self, data: bytes | bytearray) -> None:
        self.data += data

    def discard(self) -> None:
        self.discarded = True


def test_multipart_parts_split_at_any_chunk_boundary_and_truncation_is_refused() -> None:
    bodies = [b"DICM" + bytes(range(256)) * 3, b"\r\n--not-the-boundary\r\n", b""]
    message = b"".join(b"--xyz\r\nContent-Type: application/dicom\r\n\r\n" + body + b"\r\n"
                       for body in bodies) + b"--xyz--\r\n"
    for size in (1, 7, 64, len(message)):
        chunks = [message[i:i + size] for i in range(0, len(message), size)]
        assert [bytes(s.data) for s in split_parts(chunks, b"xyz", _Sink)] == bodies
    sinks: list[_Sink] = []

    def new_sink() -> _Sink:
        sinks.append(_Sink())
        return sinks[-1]

    with pytest.raises(MultipartError, match="truncated"):
        list(split_parts([message[:120]], b"xyz", new_sink))
    assert sinks[-1].discarded
    json_part = b"--xyz\r\nContent-Type: application/json\r\n\r\n{}\r\n--xyz--"
    with pytest.raises(MultipartError, match="application/json, not application/dicom"):
        list(split_parts([json_part], b"xyz", _Sink))


# ---------------------------------------------------------------- a PACS link that stops mid-way

class StallingProxy:
    """A TCP proxy to 127.0.0.1:`target` that forwards replies until `stall_after` bytes have
    passed, then stops forwarding (a pull is blocked inside a reply) or, with `cut`, closes the
    connection (a reply ends early)."""

    def __init__(self, target: int, stall_after: int, cut: bool = False) -> None:
        self.target, self.stall_after, self.cut = target, stall_after, cut
        self.stalled = threading.Event()
        self._sent = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = [self._server]

    def __enter__(self) -> "StallingProxy":
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stalled.set()
        for sock in self._sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, reply: bool) -> None:
        try:
            while data := source.recv(4096):
                if reply and self._sent + len(data) > self.stall_after:
                    self.stalled.set()
                    if self.cut:
                        sink.sendall(data[: self.stall_after - self._sent])
                        sink.shutdown(socket.SHUT_RDWR)
                        sink.close()
                    return  # forwards nothing more: the client waits (or sees the cut)
                self._sent += len(data) if reply else 0
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)  # a reply that ends with its connection
        except OSError:
            return


@contextlib.contextmanager
def TlsFront(orthanc: Orthanc, pem: Path) -> Iterator[int]:
    """HTTPS in front of Orthanc's HTTP: a reverse proxy for GET, one reply per connection."""

    class Forward(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
            with requests.get(orthanc.url + self.path, headers=headers, stream=True, timeout=30) as reply:
                self.send_response(reply.status_code)
                self.send_header("Content-Type", reply.headers.get("Content-Type", ""))
                self.send_header("Connection", "close")
                self.end_headers()
                for chunk in reply.raw.stream(1 << 16, decode_content=False):
                    self.wfile.write(chunk)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pem)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    # handshakes in the per-connection threads: one stuck client must not block the others
    server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
