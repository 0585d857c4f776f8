"""Shipped model weights, installed as ``pe_triage_node.shipped_models``."""
