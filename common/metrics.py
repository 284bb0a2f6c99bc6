"""What every daemon's ``/metrics`` shares: the flags, the loopback rule, and the text writer.

Each daemon keeps its metrics in its own ``prometheus_client.CollectorRegistry``
and serves it with ``common.metrics_http.MetricsHttpServer(listen, lambda: render(registry))``.

Guarantees:
- ``--metrics-listen HOST:PORT`` (port 0 picks one) is off unless given.
  Metrics are plaintext HTTP, so a non-loopback address is refused unless
  ``--insecure-metrics`` (``metrics_listen_from_args``), as plaintext gRPC is
  refused without ``--insecure`` (common/security/tls.py).
- ``render`` writes the Prometheus text format 0.0.4 from a registry.
  Hand-written because prometheus_client's ``generate_latest`` always
  declares a counter as ``NAME_total``, while Triton's counters
  (``nv_inference_request_success`` ...) have no suffix and dashboards built
  for Triton query exactly those names: a ``TritonCounter`` family is written
  under its own name; every other counter (``prometheus_client.Counter``,
  ``CounterMetricFamily``) as ``NAME_total``, samples or not.
- Label names shared by every daemon: ``model``, ``version``, ``replica``
  (the scheduler's replica id), ``node`` (the node agent's ``--name``).
"""

from __future__ import annotations

import argparse

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from meshserve.common.listen import ListenError, split_address
from meshserve.common.security.tls import is_loopback

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_FLAG = "--metrics-listen"
INSECURE_METRICS_FLAG = "--insecure-metrics"

# The label names every daemon uses for the same things.
MODEL, VERSION, REPLICA, NODE = "model", "version", "replica", "node"

# Samples prometheus_client adds that the 0.0.4 text format has no use for (creation timestamps).
_SKIPPED_SUFFIXES = ("_created",)


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(METRICS_FLAG, metavar="HOST:PORT",
                        help="serve Prometheus GET /metrics on HOST:PORT (plaintext HTTP; port 0 picks one); "
                             f"off by default; loopback only unless {INSECURE_METRICS_FLAG}")
    parser.add_argument(INSECURE_METRICS_FLAG, action="store_true",
                        help=f"allow {METRICS_FLAG} on a non-loopback address: the metrics are plaintext and "
                             "unauthenticated (model names, replica ids, node names)")


def check_metrics_listen(address: str, insecure: bool) -> None:
    """Raise ``ValueError`` for a malformed address, or a non-loopback one unless ``insecure``."""
    try:
        host, _ = split_address(address)
    except ListenError as err:
        raise ValueError(f"{METRICS_FLAG}: {err}") from None
    if not insecure and not is_loopback(host):
        raise ValueError(f"{METRICS_FLAG} {address}: metrics are plaintext HTTP, served on loopback only "
                         f"unless {INSECURE_METRICS_FLAG}")


def metrics_listen_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The checked ``--metrics-listen`` address, or None (off); a bad one is a usage error (exit 2)."""
    address = args.metrics_listen
    if address is None:
        return None
    try:
        check_metrics_listen(address, args.insecure_metrics)
    except ValueError as err:
        parser.error(str(err))
    return address


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample_line(sample: Sample) -> str:
    labels = ""
    if sample.labels:
        labels = "{" + ",".join(f'{key}="{_escape_label(str(value))}"'
                                for key, value in sorted(sample.labels.items())) + "}"
    return f"{sample.name}{labels} {floatToGoString(sample.value)}"


class TritonCounter(Metric):
    """A counter family whose samples keep its name, without ``_total`` (Triton's); ``add(labels, value)``."""

    def __init__(self, name: str, documentation: str):
        super().__init__(name, documentation, "counter")

    def add(self, labels: dict[str, str], value: float) -> None:
        self.add_sample(self.name, labels, float(value))


def _declared_name(family: Metric) -> str:
    """prometheus_client names a counter's samples ``NAME_total``; a ``TritonCounter``'s are ``NAME``."""
    if family.type == "counter" and not isinstance(family, TritonCounter):
        return f"{family.name}_total"
    return family.name


def render(registry: Collector) -> str:
    """The Prometheus text format (0.0.4) of every family in ``registry``, sample names unchanged."""
    lines: list[str] = []
    for family in registry.collect():
        kind = {"unknown": "untyped", "info": "gauge", "stateset": "gauge"}.get(family.type, family.type)
        samples = [s for s in family.samples if not s.name.endswith(_SKIPPED_SUFFIXES)]
        name = _declared_name(family)
        documentation = family.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        lines.append(f"# HELP {name} {documentation}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(_sample_line(sample) for sample in samples)
    return "\n".join(lines) + "\n" if lines else ""
