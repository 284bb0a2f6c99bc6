"""Scraping a daemon's ``/metrics`` over a real socket and parsing it with Prometheus' own text parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 10.0


def scrape_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT_S) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


class Scrape:
    """One scrape, parsed: families by name; ``value(sample, **labels)`` reads one sample."""

    def __init__(self, text: str):
        self.text = text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}

    @classmethod
    def of(cls, address: str) -> Scrape:
        return cls(scrape_text(address))

    def samples(self, name: str, **labels: str) -> list:
        """Samples named ``name`` whose labels include ``labels``. The parser names counter samples
        NAME_total whatever the text said (Triton's have no suffix), so both spellings match."""
        found = []
        for family in self.families.values():
            for sample in family.samples:
                if sample.name in (name, f"{name}_total") and all(sample.labels.get(k) == v
                                                                   for k, v in labels.items()):
                    found.append(sample)
        return found

    def value(self, name: str, **labels: str) -> float:
        samples = self.samples(name, **labels)
        assert len(samples) == 1, f"{len(samples)} samples {name}{labels} in:\n{self.text}"
        return samples[0].value

    def type_of(self, family: str) -> str:
        return self.families[family].type
