"""Context parallelism: one long sequence's attention spread over the ranks of a torch.distributed group,
each rank receiving exactly the keys its queries need (see docs/python-api.md, "Context parallelism")."""

from .context_parallel import context_parallel
from .placement import Placement
from .plan import Plan, plan

__all__ = ["Placement", "Plan", "context_parallel", "plan"]
