"""Tests of hpcseg.imaging and hpcseg.phantoms."""
