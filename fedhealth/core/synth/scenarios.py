"""Named non-IID scenarios: each federation built to show one kind of heterogeneity on purpose.

A scenario fixes, per hospital, how many images it holds, how many show the finding, which vendor
acquired them and which labelling protocol named them. `fedhealth synth --scenario NAME` writes it;
explicit knobs (sites, sizes, label skew, scanner shift) override what they name. The README says,
per scenario, which method the literature expects to win and why.
"""

from dataclasses import dataclass, replace

from fedhealth.core.synth.vendors import Vendor, vendor_for_site

#: Nodule radii drawn uniformly from this range (mm); large enough to learn from a few hundred images.
NODULE_MM = (24.0, 40.0)


@dataclass(frozen=True)
class SiteDesign:
    """One synthetic hospital.

    prevalence: share of its images that show a nodule.
    positive_from_mm, positive_below_contrast: its labelling protocol. A nodule is labelled a
        finding only from `positive_from_mm` radius on (0: any size), as a stricter hospital
        would, and only while its peak contrast is below `positive_below_contrast` (1: any
        contrast): a hospital that calls dense, calcified nodules benign labels the brightest 0.
    """

    images: int
    prevalence: float
    vendor: Vendor
    positive_from_mm: float = 0.0
    positive_below_contrast: float = 1.0


@dataclass(frozen=True)
class Scenario:
    """A federation design: one SiteDesign per hospital, and the nodules all of them draw
    (radii uniform in `nodule_mm`, peak contrast uniform in `nodule_contrast`, in [0, 1]
    intensity units).

    split_shares: the (train, val, test) shares of patients the label manifests fix, or None to
    leave the split to each site (60/20/20). A benchmark fixes a large test split, so intervals
    are narrow, and a small train split, so sites are as short of labelled cases as a hospital
    is: only then can collaboration beat training alone.
    """

    name: str
    summary: str
    sites: tuple[SiteDesign, ...]
    nodule_mm: tuple[float, float] = NODULE_MM
    nodule_contrast: tuple[float, float] = (0.3, 0.3)
    split_shares: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.split_shares is not None and (
                min(self.split_shares) <= 0 or abs(sum(self.split_shares) - 1) > 1e-9):
            raise ValueError(f"scenario {self.name}: split_shares {self.split_shares} must be "
                             "three positive shares (train, val, test) summing to 1")

    def label_prevalence(self, site: SiteDesign) -> float:
        """The share of `site`'s images its protocol labels 1 (radius and contrast are uniform
        and independent)."""
        return (site.prevalence * _share_at_least(self.nodule_mm, site.positive_from_mm)
                * (1 - _share_at_least(self.nodule_contrast, site.positive_below_contrast)))

    def resized(self, sites: int | None = None,
                images_per_site: int | tuple[int, ...] | None = None) -> "Scenario":
        """The same design for another number of sites (designs repeat in order) or other sizes."""
        designs = self.sites
        if sites is not None:
            if sites < 1:
                raise ValueError(f"sites must be >= 1, got {sites}")
            designs = tuple(designs[k % len(designs)] for k in range(sites))
        if images_per_site is not None:
            counts = ((images_per_site,) * len(designs) if isinstance(images_per_site, int)
                      else tuple(images_per_site))
            if len(counts) != len(designs):
                raise ValueError(f"images_per_site has {len(counts)} entries for "
                                 f"{len(designs)} sites")
            if min(counts) < 1:
                raise ValueError(f"every site needs at least one image, got {list(counts)}")
            designs = tuple(replace(d, images=n) for d, n in zip(designs, counts))
        return replace(self, sites=designs)

    def with_label_skew(self, label_skew: float) -> "Scenario":
        """Prevalence spread linearly across sites: 50% everywhere at 0, 5% to 95% at 1."""
        return replace(self, sites=tuple(replace(d, prevalence=p) for d, p in
                                         zip(self.sites, spread_prevalence(len(self.sites),
                                                                           label_skew))))

    def with_scanner_shift(self, scanner_shift: float) -> "Scenario":
        """Vendor k of the shipped list at site k, its image-level effects scaled by the shift."""
        return replace(self, sites=tuple(replace(d, vendor=vendor_for_site(k, scanner_shift))
                                         for k, d in enumerate(self.sites)))


def _share_at_least(interval: tuple[float, float], threshold: float) -> float:
    """The share of a uniform draw from `interval` that is at least `threshold`."""
    low, high = interval
    if high == low:
        return float(low >= threshold)
    return min(1.0, max(0.0, (high - max(threshold, low)) / (high - low)))


def spread_prevalence(sites: int, label_skew: float) -> list[float]:
    """Per-site prevalence: 0.5 +- 0.45 * label_skew, spread evenly from the first site to the last."""
    if not 0 <= label_skew <= 1:
        raise ValueError(f"label_skew must be in [0, 1], got {label_skew}")
    return [0.5 + 0.45 * label_skew * (0.0 if sites == 1 else 2 * k / (sites - 1) - 1)
            for k in range(sites)]


def knob_scenario(sites: int, images_per_site: int | tuple[int, ...], label_skew: float,
                  scanner_shift: float) -> Scenario:
    """A federation described only by the generator's knobs (no named scenario)."""
    base = Scenario("custom", "label skew, scanner shift and size skew as given",
                    (SiteDesign(1, 0.5, vendor_for_site(0, 0.0)),))
    return (base.resized(sites, images_per_site).with_label_skew(label_skew)
            .with_scanner_shift(scanner_shift))


def _design(images: tuple[int, ...], prevalence: tuple[float, ...],
            shift: float) -> tuple[SiteDesign, ...]:
    return tuple(SiteDesign(n, p, vendor_for_site(k, shift))
                 for k, (n, p) in enumerate(zip(images, prevalence)))


#: concept-shift's third hospital calls a nodule a finding only while it is fainter than this: the
#: denser (calcified) ones it calls benign, which the other two call findings like any nodule.
FAINT_BELOW = 0.30


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("iid", "one vendor and one prevalence everywhere: FedAvg should match pooled",
             _design((1000, 1000, 1000), (0.5, 0.5, 0.5), 0.0), split_shares=(0.2, 0.1, 0.7)),
    Scenario("feature-shift", "a different vendor per site (contrast curve, noise, blur, field "
             "of view), equal prevalence, few labelled cases a site: the case FedBN targets",
             _design((1600, 1600, 1600, 1600), (0.5, 0.5, 0.5, 0.5), 1.0),
             split_shares=(0.1, 0.1, 0.8)),
    Scenario("label-shift", "one vendor, prevalence from 15% to 85% across sites (prior shift)",
             _design((1200, 1200, 1200), (0.15, 0.5, 0.85), 0.0), split_shares=(0.2, 0.1, 0.7)),
    Scenario("concept-shift", "one vendor, nodules faint to dense; two sites call every nodule "
             "a finding, the third calls the dense (calcified) ones benign; few labelled cases a "
             "site: the case FedPer, FedRep and Ditto target",
             (*_design((1600, 1600), (0.5, 0.5), 0.0),
              SiteDesign(1600, 0.8, vendor_for_site(0, 0.0), positive_below_contrast=FAINT_BELOW)),
             nodule_contrast=(0.12, 0.48), split_shares=(0.05, 0.05, 0.9)),
    Scenario("mixed", "label skew, scanner shift and size skew at once (the demo's)",
             _design((1600, 1200, 800), tuple(spread_prevalence(3, 0.5)), 0.5),
             split_shares=(0.2, 0.1, 0.7)),
)}
SCENARIO_NAMES: tuple[str, ...] = tuple(SCENARIOS)


def get_scenario(name: str) -> Scenario:
    """The scenario called `name`, or an error listing the names there are."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}: choose one of {', '.join(SCENARIO_NAMES)}")
    return SCENARIOS[name]
