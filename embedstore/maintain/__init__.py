"""Looking after a cache: verify every store, index and card, and repair what can be repaired.

The names below are this package's public surface; other modules are its implementation.
"""

from __future__ import annotations

from embedstore.maintain.repair import VerifyReport as VerifyReport
from embedstore.maintain.repair import verify_cache as verify_cache

__all__ = ["VerifyReport", "verify_cache"]
