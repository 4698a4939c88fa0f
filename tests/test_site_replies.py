"""What a site sends when a call fails, and what its disclosure settings let metrics reveal.

Real ClientApp handlers called with real Flower Messages and Contexts, on real DICOM folders.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

import sites.client_app as client_app
from fedhealth.core.config import RunConfig
from sites.audit import AuditLog
from sites.data_limits import DataLimits
from sites.disclosure import MetricDisclosure
from sites.site_settings import SiteSettingsError, resolve_site

CONFIG = RunConfig(encrypted=False, model="tiny", image_size=32, seed=0)
REASON = re.compile(r"[a-z-]+ error at the site; reference [0-9a-f]{12} in the site's error log")


def _message(kind: str, server_round: int = 3) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 9, 0, 0
    record = CONFIG.to_record()
    record["server-round"] = server_round
    return Message(RecordDict({"arrays": ArrayRecord(), "config": record}), dst_node_id=1,
                   message_type=kind)


def _context(data_dir: Path, state: Path, **settings: object) -> Context:
    node_config = {"site-name": "hosp-a", "data-dir": str(data_dir), "state-dir": str(state),
                   "key-file": str(state / "site.ctx"), "audit-log": str(state / "audit.jsonl"),
                   **settings}
    return Context(run_id=9, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


@pytest.mark.parametrize("kind, handler", [(MessageType.TRAIN, client_app.train),
                                           (MessageType.EVALUATE, client_app.evaluate)])
def test_a_failing_call_replies_a_category_and_reference_only(tmp_path: Path, kind: str,
                                                              handler: object) -> None:
    data = tmp_path / "radiology-export-of-patient-smith"
    data.mkdir()
    (data / "labels.csv").write_text("StudyInstanceUID,label\n1.2.3,1\n")
    for i in range(7):
        (data / f"report-{i}.txt").write_text("not DICOM")
    state = tmp_path / "state"
    reply = handler(_message(kind), _context(data, state))  # type: ignore[operator]
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert REASON.fullmatch(reply.error.reason), reply.error.reason
    assert reply.error.reason.startswith("site-data error")
    assert "smith" not in reply.error.reason and "7" not in reply.error.reason.split("reference")[0]
    reference = reply.error.reason.split("reference ")[1].split()[0]
    # audited like every other reply: exactly what left, under the instruction's round
    [entry] = AuditLog(state / "audit.jsonl").entries()
    assert (entry["kind"], entry["round"], entry["run"]) == (kind, 3, 9)
    assert entry["error"] == {"code": ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                              "reason": reply.error.reason}
    # the detail stays at the site, under the reference
    [detail] = [json.loads(line) for line in (state / "errors.jsonl").read_text().splitlines()]
    assert detail["reference"] == reference and detail["error"] == "SiteDataError"
    assert str(data) in detail["detail"] and "8 skipped" in detail["detail"]  # 7 files, 1 row


def test_a_call_without_site_settings_still_replies_cleanly(tmp_path: Path) -> None:
    context = Context(run_id=9, node_id=1, node_config={"data-dir": str(tmp_path / "secret")},
                      state=RecordDict(), run_config={})
    reply = client_app.evaluate(_message(MessageType.EVALUATE), context)
    assert reply.has_error() and REASON.fullmatch(reply.error.reason)
    assert reply.error.reason.startswith("site-settings error") and "secret" not in reply.error.reason


def test_an_unreadable_instruction_is_answered_and_audited(synth_federation: Path,
                                                           tmp_path: Path) -> None:
    message = Message(RecordDict({"arrays": ArrayRecord()}), dst_node_id=1,
                      message_type=MessageType.TRAIN)  # no run config record at all
    reply = client_app.train(message, _context(synth_federation / "hospital-1", tmp_path))
    assert reply.has_error() and reply.error.reason.startswith("internal error")
    [entry] = AuditLog(tmp_path / "audit.jsonl").entries()
    assert entry["round"] is None and entry["kind"] == MessageType.TRAIN


def test_a_failing_query_is_audited_under_round_zero(synth_federation: Path,
                                                     tmp_path: Path) -> None:
    reply = client_app.census(_message(MessageType.QUERY),  # a query, but not the census
                              _context(synth_federation / "hospital-1", tmp_path))
    assert reply.has_error() and REASON.fullmatch(reply.error.reason)
    [entry] = AuditLog(tmp_path / "audit.jsonl").entries()
    assert (entry["kind"], entry["round"]) == ("query", 0)


def test_disclosure_settings_round_withhold_and_step(synth_federation: Path,
                                                     tmp_path: Path) -> None:
    site = Path(shutil.copytree(synth_federation / "hospital-1", tmp_path / "hospital-1"))
    exact = client_app.evaluate(_message(MessageType.EVALUATE), _context(site, tmp_path / "a"))
    limited = client_app.evaluate(
        _message(MessageType.EVALUATE),
        _context(site, tmp_path / "b", **{"metric-decimals": 1, "withhold-metrics": "accuracy, auc",
                                           "count-step": 10}))
    full, shown = dict(exact.content["metrics"]), dict(limited.content["metrics"])
    assert {"accuracy", "auc"} <= set(full) and not {"accuracy", "auc"} & set(shown)
    assert set(shown) == set(full) - {"accuracy", "auc"}
    for name, value in shown.items():
        if name == "num-examples":
            assert value % 10 == 0 and 0 <= value - full[name] < 10
        else:
            assert value == round(full[name], 1)
    assert full["num-examples"] % 10 != 0  # the test split is not already a multiple of 10


def test_site_settings_are_parsed_and_refused_with_the_key(tmp_path: Path) -> None:
    base = {"data-dir": str(tmp_path), "state-dir": str(tmp_path), "key-file": "k"}
    site = resolve_site({**base, "max-image-mb": 500, "num-classes": 3, "metric-decimals": 2,
                         "withhold-metrics": "accuracy", "count-step": 5}, CONFIG)
    assert site.limits == DataLimits(max_image_mb=500.0, num_classes=3)
    assert site.disclosure == MetricDisclosure(2, frozenset({"accuracy"}), 5)
    assert resolve_site(base, CONFIG).limits == DataLimits()
    for key, value, says in [("max-image-mb", 0, "positive"), ("max-image-mb", "big", "a number"),
                             ("num-classes", 1, "at least 2"), ("num-classes", 2.5, "an integer"),
                             ("metric-decimals", 99, "0..15"), ("count-step", 0, "positive"),
                             ("withhold-metrics", "auc,num-examples", "cannot name 'num-examples'")]:
        with pytest.raises(SiteSettingsError, match=f"{key}.*{says}"):
            resolve_site({**base, key: value}, CONFIG)


def test_site_toml_limits_reach_the_node_config_and_the_preflight(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    from fedhealth.app.deployment.bundles import init_federation
    from fedhealth.app.deployment.site_config import SiteConfigError, load_site_config, preflight
    from fedhealth.core.synth import synthesize_federation

    synthesize_federation(tmp_path / "data", 1, 3, images_per_site=8)
    init_federation("t", ["a"], "127.0.0.1:9093", tmp_path / "fed")
    toml = tmp_path / "fed" / "a" / "site.toml"
    text = toml.read_text().replace(
        'data-dir = ""', f'data-dir = "{tmp_path / "data" / "hospital-1"}"\nmax-image-mb = 0.001\n'
                         'metric-decimals = 2\nwithhold-metrics = "accuracy"')
    toml.write_text(text)
    config = load_site_config(toml)
    site = resolve_site(parse_config_args([config.node_config()]), CONFIG)  # as Flower passes it
    assert site.limits == DataLimits(max_image_mb=0.001)
    assert site.disclosure == MetricDisclosure(2, frozenset({"accuracy"}))
    with pytest.raises(SiteConfigError, match="no usable labeled image"):
        preflight(config)  # every 64 x 64 16-bit image (8192 bytes) is over 0.001 MB
    toml.write_text(text.replace("metric-decimals = 2", "metric-decimals = 99"))
    with pytest.raises(SiteConfigError, match=r"\[site\] .*metric-decimals must be 0..15"):
        load_site_config(toml)
