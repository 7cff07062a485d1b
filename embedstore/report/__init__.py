"""What runs leave behind: prediction files (written and read), the run log, the HTML report.

The names below are this package's public surface; other modules are its implementation.
"""

from __future__ import annotations

from embedstore.report.html import write_report as write_report
from embedstore.report.prediction_file import PredictionFile as PredictionFile
from embedstore.report.prediction_file import read_predictions as read_predictions
from embedstore.report.predictions import append_log as append_log
from embedstore.report.predictions import read_log as read_log
from embedstore.report.predictions import write_predictions as write_predictions

__all__ = [
    "PredictionFile",
    "append_log",
    "read_log",
    "read_predictions",
    "write_predictions",
    "write_report",
]
