"""The app layer, on top of the sites and the aggregator: ServerApp, simulation, compare, demo,
the `fedhealth` CLI and deployment. Nothing below imports it.
"""
