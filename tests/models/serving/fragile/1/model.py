"""fragile: Y = 2 * X; raises ValueError naming the first negative value of X."""

import numpy as np


class Predictor:
    def __init__(self, config: dict):
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["X"]
        if (x < 0).any():
            raise ValueError(f"fragile refuses negative input {float(x[x < 0][0])}")
        return {"Y": x * np.float32(2)}
