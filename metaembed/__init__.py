"""MetaEmbed tooling: training, search, evaluation, conversion, the `metaembed` command and its demo.

The model itself lives in the Hub set (`configuration_metaembed`, `modeling_metaembed`, `processing_metaembed`,
`scoring_metaembed`, ...), the files a saved model folder carries; this package imports them and never the
other way round. The public API is re-exported here.
"""

from backbones_metaembed import SUPPORTED_MODEL_TYPES, get_backbone_adapter
from configuration_metaembed import MetaEmbedConfig
from modeling_metaembed import MetaEmbedModel
from processing_metaembed import MetaEmbedProcessor
from scoring_metaembed import MMR_BUDGETS, late_interaction_scores

from .evaluation import evaluate
from .search import MetaEmbedIndex
from .training import CachedMMRLoss, MMRLoss, mmr_loss, train_metaembed

__version__ = "0.2.0"

__all__ = [
    "MMR_BUDGETS",
    "SUPPORTED_MODEL_TYPES",
    "CachedMMRLoss",
    "MMRLoss",
    "MetaEmbedConfig",
    "MetaEmbedIndex",
    "MetaEmbedModel",
    "MetaEmbedProcessor",
    "evaluate",
    "get_backbone_adapter",
    "late_interaction_scores",
    "mmr_loss",
    "train_metaembed",
]
