"""Training data: read sources, normalise records to chat messages.

The driver checks sources before any worker starts (``check_sources``); each
worker reads conversations with ``load_conversations``.
"""

from sft_cluster.data.records import (
    DataError,
    check_sources,
    load_conversations,
    resolve_source_uris,
)

__all__ = ["DataError", "check_sources", "load_conversations", "resolve_source_uris"]
