"""postprocess: classifier logits -> the top-k "score:index:label" strings.

LOGITS is FP32 [batch, 10]. Softmax turns each row into probabilities; the
k best (k is the LABELS dims of the config, 5) come out as BYTES
"score:index:label", highest first, in the format of Triton's classification
extension (score with six decimals, e.g. "0.712345:3:lagoon"; ties keep the
lower index first). Labels are read from the file named by the ``labels``
parameter (default labels.txt, one a line) in the version folder.
"""

from __future__ import annotations

import pathlib

import numpy as np

DEFAULT_TOP_K = 5


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax over the last axis, computed in float64."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Predictor:
    def __init__(self, config: dict):
        self.name = config.get("name", "postprocess")
        labels_file = config.get("parameters", {}).get("labels", "labels.txt")
        path = pathlib.Path(config["model_dir"]) / labels_file
        self.labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.top_k = DEFAULT_TOP_K
        for tensor in config.get("outputs", []):
            if tensor["name"] == "LABELS" and tensor["shape"] and tensor["shape"][-1] > 0:
                self.top_k = int(tensor["shape"][-1])

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits = np.asarray(inputs["LOGITS"], dtype=np.float32)
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise ValueError(
                f"{self.name}: LOGITS shape {list(logits.shape)}, expected [batch, {len(self.labels)}]"
            )
        if self.top_k > logits.shape[1]:
            raise ValueError(f"{self.name}: LABELS asks for the top {self.top_k} of {logits.shape[1]} classes")
        probabilities = softmax(logits)
        out = np.empty((logits.shape[0], self.top_k), dtype=object)
        for row, p in enumerate(probabilities):
            for column, index in enumerate(np.argsort(-p, kind="stable")[: self.top_k]):
                out[row, column] = f"{p[index]:f}:{index}:{self.labels[index]}".encode()
        return {"LABELS": out}
