"""Each named scenario has the property it models, on real files the generator writes."""

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from fedhealth.app.cli import app
from fedhealth.core.synth.federation import synthesize
from fedhealth.core.synth.scenarios import SCENARIO_NAMES, get_scenario
from sites.dataset import index_site


def _write(tmp_path: Path, name: str, images: int, masks: bool = False) -> list[Path]:
    synthesize(tmp_path, get_scenario(name).resized(images_per_site=images), seed=5,
               segmentation_masks=masks)
    return sorted(p for p in tmp_path.iterdir() if p.is_dir())


def _rows(site: Path) -> list[dict[str, str]]:
    with (site / "labels.csv").open() as f:
        return list(csv.DictReader(f))


def _prevalence(site: Path) -> float:
    return float(np.mean([int(r["label"]) for r in _rows(site)]))


def _images(site: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted((site / "export").rglob("*")) if p.is_file()]


def _noise(ds: pydicom.Dataset) -> float:
    """High-frequency energy of the presentation image: what a vendor's noise and blur set."""
    pixels = ds.pixel_array.astype(float) / (2**ds.BitsStored - 1)
    return float(np.abs(np.diff(pixels, axis=1)).mean())


def test_iid_sites_share_vendor_and_prevalence(tmp_path: Path) -> None:
    sites = _write(tmp_path, "iid", 40)
    vendors = {ds.Manufacturer for s in sites for ds in _images(s)}
    assert len(vendors) == 1
    assert {_prevalence(s) for s in sites} == {0.5}


def test_feature_shift_differs_in_images_not_in_prevalence(tmp_path: Path) -> None:
    sites = _write(tmp_path, "feature-shift", 40)
    assert {_prevalence(s) for s in sites} == {0.5}
    assert len({_images(s)[0].Manufacturer for s in sites}) == len(sites)
    noise = [np.mean([_noise(ds) for ds in _images(s)]) for s in sites]
    assert max(noise) > 1.5 * min(noise), noise  # acquisition differences survive in the pixels


def test_label_shift_spreads_prevalence_with_one_vendor(tmp_path: Path) -> None:
    sites = _write(tmp_path, "label-shift", 40)
    prevalence = [_prevalence(s) for s in sites]
    assert prevalence[0] <= 0.2 and prevalence[-1] >= 0.8
    assert len({ds.Manufacturer for s in sites for ds in _images(s)}) == 1


def test_concept_shift_gives_the_same_finding_different_labels(tmp_path: Path) -> None:
    sites = _write(tmp_path, "concept-shift", 80, masks=True)
    negatives_with_a_nodule, inside = [], []
    for site in sites:
        rows = _rows(site)
        masks = [np.load(site / r["mask"]).astype(bool) for r in rows]
        labels = [int(r["label"]) for r in rows]
        assert all(m.any() for m, label in zip(masks, labels) if label == 1)
        negatives_with_a_nodule.append(sum(m.any() and not label for m, label in zip(masks, labels)))
        pixels = {r["SOPInstanceUID"]: ds.pixel_array / (2**ds.BitsStored - 1.0)
                  for r, ds in zip(rows, _images_by_uid(site, rows))}
        inside.append({label: [float(pixels[r["SOPInstanceUID"]][m].mean())
                               for r, m, y in zip(rows, masks, labels) if m.any() and y == label]
                       for label in (0, 1)})
    # two sites call every nodule a finding; the third leaves the dense ones at 0 ...
    assert negatives_with_a_nodule[:2] == [0, 0] and negatives_with_a_nodule[2] > 0
    # ... and its benign nodules are the brighter ones: the same finding, labelled otherwise
    assert np.mean(inside[2][0]) > np.mean(inside[2][1]) + 0.05, inside[2]
    assert len({ds.Manufacturer for s in sites for ds in _images(s)}) == 1


def _images_by_uid(site: Path, rows: list[dict[str, str]]) -> list[pydicom.Dataset]:
    """The site's images in the order of its label rows."""
    by_uid = {ds.SOPInstanceUID: ds for ds in _images(site)}
    return [by_uid[r["SOPInstanceUID"]] for r in rows]


def test_mixed_has_size_skew_vendors_and_prevalence_spread(tmp_path: Path) -> None:
    scenario = get_scenario("mixed")
    sizes = [s.images for s in scenario.sites]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    sites = _write(tmp_path, "mixed", 30)
    assert len({_images(s)[0].Manufacturer for s in sites}) == len(sites)
    prevalence = [_prevalence(s) for s in sites]
    assert prevalence == sorted(prevalence) and prevalence[-1] - prevalence[0] > 0.3


@pytest.mark.parametrize("name", SCENARIO_NAMES)
def test_every_scenario_sizes_test_splits_for_a_tight_interval(name: str) -> None:
    """The test split (the scenario's share, else the site's 20%) with the design's prevalence,
    scored at 0.85 balanced accuracy, gives a 95% interval of at most +-0.04 at every site
    (binomial standard errors per class)."""
    scenario = get_scenario(name)
    test_share = scenario.split_shares[2] if scenario.split_shares else 0.2
    for site in scenario.sites:
        test = test_share * site.images
        prevalence = scenario.label_prevalence(site)
        positives, negatives = test * prevalence, test * (1 - prevalence)
        half_width = 1.96 * 0.5 * np.sqrt(0.85 * 0.15 / positives + 0.85 * 0.15 / negatives)
        assert half_width <= 0.04, (name, site)


def test_split_shares_are_written_per_patient_and_the_site_keeps_them(tmp_path: Path) -> None:
    scenario = get_scenario("feature-shift").resized(sites=1, images_per_site=400)
    assert scenario.split_shares is not None
    synthesize(tmp_path, scenario, seed=5)
    site = next(p for p in tmp_path.iterdir() if p.is_dir())
    index = index_site(site, seed=9)
    written = {r["SOPInstanceUID"]: r["split"] for r in _rows(site)}
    assert all(index.split[x.image.patient_id] == written[x.image.sop_uid] for x in index.images)
    shares = [len(index.in_split(s)) / len(index.images) for s in ("train", "val", "test")]
    np.testing.assert_allclose(shares, scenario.split_shares, atol=0.07)
    with pytest.raises(ValueError, match="split_shares"):
        replace(scenario, split_shares=(0.5, 0.5, 0.5))


def test_cli_scenario_alone_writes_it_and_flags_override(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["synth", "--out", str(tmp_path), "--scenario",
                                      "label-shift", "--images-per-site", "20", "--sites", "2"])
    assert result.exit_code == 0, result.output
    sites = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(sites) == 2 and all(len(_rows(s)) == 20 for s in sites)
    bad = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "x"), "--scenario", "nope"])
    assert bad.exit_code != 0 and "choose one of" in bad.output
