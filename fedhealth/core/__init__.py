"""The shared core: what a site and the aggregator both build on, and nothing of either side.

Run config, the wire and file vocabulary, the CKKS codec and key files, the model zoo and its
layer partition, the synthetic DICOM generator. It imports neither `sites` nor `strategies`.
"""
