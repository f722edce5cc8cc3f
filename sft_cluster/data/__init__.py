"""Training data: read sources, normalise records to chat messages, plan, stream and pack.

The driver checks sources before any worker starts (``check_sources``) and
plans them once (``build_plan``); each worker reads its own share of the plan
(``RankStream`` in ``sft_cluster.data.reader``) and packs it into rows
(``PackedDataset`` in ``sft_cluster.data.stream``, which needs torch), with a
cursor that is saved in every checkpoint.
"""

from sft_cluster.data.plan import (
    ShardPlan,
    build_plan,
    list_sources,
    make_plan,
    plan_changes,
    same_listing,
)
from sft_cluster.data.records import (
    DataError,
    check_sources,
    load_conversations,
    resolve_source_uris,
)

__all__ = [
    "DataError",
    "ShardPlan",
    "build_plan",
    "check_sources",
    "list_sources",
    "load_conversations",
    "make_plan",
    "plan_changes",
    "same_listing",
    "resolve_source_uris",
]
