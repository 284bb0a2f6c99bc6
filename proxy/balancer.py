"""Choosing a replica for one request: weighted route, then least outstanding of two random choices.

Guarantees:
- Traffic splits between the routes of a model by ``weight``, among the
  routes that have a candidate replica left (a revision with every replica
  out of rotation gets nothing; its share goes to the others). Routes that
  all weigh 0 share equally.
- Within the route, two distinct replicas are drawn at random and the one
  with fewer outstanding requests wins ("power of two choices"): close to
  least-loaded without herding every request onto one replica.
- Replicas in rotation are preferred; only when none is left (every replica
  failed recently) are the others tried, so a brief blip everywhere does
  not refuse traffic that would succeed.
- Replicas in ``exclude`` (already tried by this call) are never chosen.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from .endpoints import Endpoint, EndpointPool
from .routes import Route


class Balancer:
    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def pick(self, routes: Iterable[Route], pool: EndpointPool, exclude: AbstractSet[str] = frozenset()) -> Endpoint | None:
        routes = list(routes)
        for in_rotation_only in (True, False):
            options = []
            for route in routes:
                candidates = [
                    endpoint for info in route.endpoints
                    if info.address not in exclude
                    and (endpoint := pool.get(info.address)) is not None
                    and (endpoint.healthy or not in_rotation_only)
                ]
                if candidates:
                    options.append((route.weight, candidates))
            if options:
                return self._least_of_two(self._weighted(options))
        return None

    def _weighted(self, options: list[tuple[int, list[Endpoint]]]) -> list[Endpoint]:
        if len(options) == 1:
            return options[0][1]
        total = sum(weight for weight, _ in options)
        if total <= 0:
            return self.rng.choice(options)[1]
        point = self.rng.random() * total
        for weight, candidates in options:
            point -= weight
            if point < 0:
                return candidates
        return options[-1][1]

    def _least_of_two(self, candidates: list[Endpoint]) -> Endpoint:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self.rng.sample(candidates, 2)
        return second if second.outstanding < first.outstanding else first
