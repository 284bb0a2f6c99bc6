"""print_then_raise: prints a line on stdout and one on stderr, then fails to load with a chained exception."""

import sys

import numpy as np


def _open_weights(path: str) -> bytes:
    raise FileNotFoundError(f"no such file: {path}")


class Predictor:
    def __init__(self, config: dict):
        print("print_then_raise: loading weights from /nowhere/model.bin", flush=True)
        print("print_then_raise: a warning on stderr", file=sys.stderr, flush=True)
        try:
            _open_weights("/nowhere/model.bin")
        except FileNotFoundError as err:
            raise ValueError("weights for print_then_raise are missing") from err

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"Y": inputs["X"]}
