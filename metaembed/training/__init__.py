"""Training MetaEmbed with Matryoshka Multi-Vector Retrieval (MMR).

- `loss`: `mmr_loss` on embeddings, `MMRLoss` on batches of items (`ItemBatch`) or processed features.
- `cached_loss`: `CachedMMRLoss`, the same loss with a gradient cache (large batches).
- `distributed`: candidates gathered across ranks, gradients averaged as DDP does.
- `data`: `MetaEmbedDataCollator`, `datasets` rows -> batches of checked items (`ItemBatch`).
- `trainer`: `train_metaembed` on the transformers Trainer, LoRA on the backbone.
"""

from .cached_loss import CachedMMRLoss
from .data import MetaEmbedDataCollator
from .loss import DEFAULT_TEMPERATURE, MMR_GROUPS, ItemBatch, MMRLoss, MMRLossOutput, embed_with_model, mmr_loss
from .trainer import train_metaembed

__all__ = [
    "DEFAULT_TEMPERATURE",
    "MMR_GROUPS",
    "CachedMMRLoss",
    "ItemBatch",
    "MMRLoss",
    "MMRLossOutput",
    "MetaEmbedDataCollator",
    "embed_with_model",
    "mmr_loss",
    "train_metaembed",
]
