"""Tests of the model code: hpcseg.server.{models,inference,...} and hpcseg.training."""
