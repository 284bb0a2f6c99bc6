"""Imports a module that no host has: loading this model fails with ModuleNotFoundError, every time."""

import meshserve_test_no_such_module  # noqa: F401


class Predictor:
    def __init__(self, config):
        self.config = config

    def predict(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"]}
