"""Training MetaEmbed with Matryoshka Multi-Vector Retrieval (MMR).

- `loss`: `mmr_loss` on embeddings, `MMRLoss` on processed batches, `split_features`.
- `cached_loss`: `CachedMMRLoss`, the same loss with a gradient cache (large batches).
- `distributed`: candidates gathered across ranks, gradients averaged as DDP does.
- `data`: `MetaEmbedDataCollator`, `datasets` rows -> processed batches.
- `trainer`: `train_metaembed` on the transformers Trainer, LoRA on the backbone.
"""

from .cached_loss import CachedMMRLoss
from .data import MetaEmbedDataCollator
from .loss import DEFAULT_TEMPERATURE, MMR_GROUPS, MMRLoss, MMRLossOutput, embed_with_model, mmr_loss, split_features
from .trainer import LORA_TARGET_MODULES, train_metaembed

__all__ = [
    "DEFAULT_TEMPERATURE",
    "LORA_TARGET_MODULES",
    "MMR_GROUPS",
    "CachedMMRLoss",
    "MMRLoss",
    "MMRLossOutput",
    "MetaEmbedDataCollator",
    "embed_with_model",
    "mmr_loss",
    "split_features",
    "train_metaembed",
]
