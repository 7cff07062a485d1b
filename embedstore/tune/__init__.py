"""Searching over experiments on cached features: weight/template studies, linear heads, voting.

The names below are this package's public surface; other modules are its implementation.
"""

from __future__ import annotations

from embedstore.tune.head_fit import greedy_soup as greedy_soup
from embedstore.tune.head_fit import train_head as train_head
from embedstore.tune.study import Objective as Objective
from embedstore.tune.study import run_study as run_study
from embedstore.tune.training import train_heads as train_heads
from embedstore.tune.vote import vote_files as vote_files
from embedstore.tune.vote import write_votes as write_votes

__all__ = ["Objective", "greedy_soup", "run_study", "train_head", "train_heads", "vote_files", "write_votes"]
