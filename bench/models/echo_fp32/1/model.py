"""echo_fp32: OUTPUT0 is INPUT0, unchanged; the cost measured is the server's, not the model's."""

from __future__ import annotations

import numpy as np


class Predictor:
    def __init__(self, config: dict):
        self.name = config.get("name", "echo_fp32")

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUTPUT0": inputs["INPUT0"]}
