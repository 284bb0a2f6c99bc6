"""Flags every side-by-side benchmark shares: how long a cell runs and how it alternates."""

from __future__ import annotations

import argparse


def add_cell_arguments(parser: argparse.ArgumentParser, rounds_help: str) -> None:
    parser.add_argument("--duration", type=float, default=5.0,
                        help="measured seconds per cell, split over --rounds (default 5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per slice")
    parser.add_argument("--rounds", type=int, default=2, help=rounds_help)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 0.5 s cells, 0.2 s warm-up, one round")


def settle_cell_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Apply --quick and keep at least one round."""
    if args.quick:
        args.duration, args.warmup, args.rounds = 0.5, 0.2, 1
    args.rounds = max(1, args.rounds)
    return args
