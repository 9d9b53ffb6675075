"""Backbones: feature extractors whose ``out_features`` the algorithms put a head on."""
