"""Deployment on Flower's Deployment Engine: certificates, bundles, site config, launchers.

A coordinator runs one SuperLink, each hospital one SuperNode; TLS and SuperNode
authentication are always on. Nothing here ever holds a site's secret CKKS key except the
code that writes it into that site's own bundle.
"""
