"""What the scheduler reads from a stored deployment spec (``DeploymentSpec.to_dict()``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Needs:
    gpus: int = 0
    gpu_memory: int = 0     # bytes, per GPU
    cpu: float = 0.0
    memory: int = 0         # bytes
    node_selector: dict = field(default_factory=dict)
    strategy: str = "spread"


def _size(value) -> int:
    if isinstance(value, int):
        return value
    from .spec import parse_size

    return parse_size(value) if value else 0


def resources_of(spec: dict) -> Needs:
    resources = spec.get("resources") or {}
    placement = spec.get("placement") or {}
    return Needs(
        gpus=int(resources.get("gpus") or 0),
        gpu_memory=_size(resources.get("gpu_memory") or 0),
        cpu=float(resources.get("cpu") or 0),
        memory=_size(resources.get("memory") or 0),
        node_selector=dict(placement.get("node_selector") or {}),
        strategy=placement.get("strategy") or "spread",
    )


def model_of(spec: dict) -> tuple[str, str]:
    """(repository path, model name)."""
    model = spec.get("model") or {}
    return model.get("repository", ""), model.get("name", "")


def digest_of(spec: dict) -> str:
    """The model's content digest pinned in this spec ("" when none was taken)."""
    return (spec.get("model") or {}).get("digest", "")


def artifact_of(spec: dict) -> tuple[str, str]:
    """(digest, source) an agent fetches the model from; ("", "") for a model at a path on every host.

    source is "scheduler" for an uploaded bundle, else the spec's http(s):// or s3:// URL."""
    model = spec.get("model") or {}
    source, digest = model.get("source", "path"), model.get("digest", "")
    if source == "path" or not digest:
        return "", ""
    return digest, "scheduler" if source == "upload" else source
