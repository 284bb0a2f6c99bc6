"""VERSION = 100 * (this folder, 2) + the version the runtime says it loaded."""

import numpy as np


class Predictor:
    def __init__(self, config: dict):
        self.version = int(config["version"])

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"VERSION": np.full_like(inputs["X"], 2 * 100 + self.version)}
