"""Stage 2 (numpy): prompt sets, experiments, the one scoring rule, members, sessions, metrics, queries.

The names below are this package's public surface; other modules are its implementation.
"""

from __future__ import annotations

from embedstore.score.experiment import Experiment as Experiment
from embedstore.score.experiment import load_experiment as load_experiment
from embedstore.score.heads import Head as Head
from embedstore.score.heads import load_head as load_head
from embedstore.score.metrics import Metrics as Metrics
from embedstore.score.metrics import compute_metrics as compute_metrics
from embedstore.score.prompts import PromptSet as PromptSet
from embedstore.score.prompts import expand as expand
from embedstore.score.prompts import load_prompt_set as load_prompt_set
from embedstore.score.query import nearest_classes as nearest_classes
from embedstore.score.query import nearest_images as nearest_images
from embedstore.score.scoring import Rule as Rule
from embedstore.score.scoring import class_scores as class_scores
from embedstore.score.scoring import predict as predict
from embedstore.score.scoring import top_k as top_k
from embedstore.score.session import ClassifyResult as ClassifyResult
from embedstore.score.session import Session as Session
from embedstore.score.splits import SplitSpec as SplitSpec
from embedstore.score.splits import split as split

__all__ = [
    "ClassifyResult",
    "Experiment",
    "Head",
    "Metrics",
    "PromptSet",
    "Rule",
    "Session",
    "SplitSpec",
    "class_scores",
    "compute_metrics",
    "expand",
    "load_experiment",
    "load_head",
    "load_prompt_set",
    "nearest_classes",
    "nearest_images",
    "predict",
    "split",
    "top_k",
]
