"""Context parallelism: one long sequence's attention spread over the ranks of a torch.distributed group,
each rank receiving exactly the keys its queries need (see docs/python-api.md, "Context parallelism")."""

from typing import Any

from .placement import Placement
from .plan import Plan, Terms, plan

__all__ = ["Placement", "Plan", "Terms", "context_parallel", "plan"]


def __getattr__(name: str) -> Any:
    """`context_parallel` on first use: it needs torch.distributed, which the analysis (patc analyze
    --ranks) does without."""
    if name == "context_parallel":
        from .context_parallel import context_parallel

        return context_parallel
    raise AttributeError(name)
