"""Synthetic DICOM federations: N hospitals with controllable label skew, scanner shift and size skew."""

from fedhealth.core.synth.federation import LABELS_FILE, MASKS_DIR, SiteSummary, synthesize_federation

__all__ = ["LABELS_FILE", "MASKS_DIR", "SiteSummary", "synthesize_federation"]
