"""`train_metaembed`: the MMR loss on the transformers Trainer, with LoRA (peft) on the backbone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from .cached_loss import CachedMMRLoss
from .data import MetaEmbedDataCollator, validate_training_rows
from .loss import DEFAULT_TEMPERATURE, MMR_GROUPS, Budget, MMRLoss


def _trainer_class() -> type:
    """`MetaEmbedTrainer`, built on first use so that importing this file does not import the Trainer stack."""
    from transformers import Trainer

    class MetaEmbedTrainer(Trainer):
        """The transformers `Trainer` with the MMR loss: progress bars, logging, checkpoints, mixed precision,
        gradient accumulation and multi-GPU (accelerate / torchrun) come from the Trainer; logs add the loss of
        every budget as `loss_{r_q}x{r_c}`."""

        def __init__(self, *args: Any, loss: MMRLoss | None = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.loss_fn = loss or MMRLoss(self.model, gather_across_devices=self.args.world_size > 1)
            self._group_loss_sums: dict[Budget, float] = {}
            self._group_loss_steps = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            output = self.loss_fn(
                inputs["queries"],
                inputs["candidates"],
                inputs.get("hard_negatives"),
                model=model,
            )
            for budget, value in output.group_losses.items():
                self._group_loss_sums[budget] = self._group_loss_sums.get(budget, 0.0) + float(value.detach())
            self._group_loss_steps += 1
            return (output.loss, {}) if return_outputs else output.loss

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs and self._group_loss_steps:
                for (r_q, r_c), total in self._group_loss_sums.items():
                    logs[f"loss_{r_q}x{r_c}"] = round(total / self._group_loss_steps, 4)
                self._group_loss_sums, self._group_loss_steps = {}, 0
            super().log(logs, *args, **kwargs)

    return MetaEmbedTrainer


def train_metaembed(
    model: nn.Module,
    train_dataset: Any,
    output_dir: str,
    *,
    groups: Sequence[Budget] = MMR_GROUPS,
    temperature: float = DEFAULT_TEMPERATURE,
    group_weights: Sequence[float] | None = None,
    lora_rank: int | None = 32,
    lora_alpha: int = 32,
    merge_lora: bool = True,
    cached_mini_batch_size: int | None = None,
    query_column: str = "query",
    positive_column: str = "positive",
    negatives_column: str | None = "negatives",
    save: bool = True,
    check_rows: bool = True,
    callbacks: list[Any] | None = None,
    **training_arguments: Any,
) -> nn.Module:
    """Train a `MetaEmbedModel` with the MMR loss on the transformers Trainer and save a complete Hub folder.

    Args:
        model: a `MetaEmbedModel` (e.g. from `MetaEmbedModel.from_backbone`), with its processor attached.
        train_dataset: rows with `query_column`, `positive_column`, optional `negatives_column` (a `datasets`
            Dataset, or any sequence of dicts); cells are text, PIL images or {"text", "image"} dicts. Every row is
            checked before training starts (`validate_training_rows`), unless the dataset has no length or
            `check_rows=False` (rows made on demand, such as the demo's: the collator still checks every item of
            each batch it builds, only later).
        output_dir: checkpoints and the final model folder.
        groups / temperature / group_weights: the MMR loss (see `mmr_loss`).
        lora_rank / lora_alpha: LoRA (peft) on the backbone family's linear layers
            (`model.backbone_adapter.lora_target_modules`: language model and vision tower), the reference's
            r = alpha = 32; the Meta Token table and the projection are trained fully. `lora_rank=None` trains
            every parameter (for backbones trained from scratch, like the demo's).
        merge_lora: merge the adapters into the weights before returning and saving, so the folder loads like
            any MetaEmbed model. With False the returned model is the peft model and nothing is saved.
        cached_mini_batch_size: use `CachedMMRLoss` with this mini-batch size (large effective batches): each
            mini-batch of items is processed and embedded on its own, for every backbone family.
        save: write the final model to `output_dir` with `save_pretrained`.
        **training_arguments: `transformers.TrainingArguments` fields (per_device_train_batch_size,
            learning_rate, max_steps, bf16, gradient_checkpointing, logging_steps, report_to, ...).

    Returns:
        the trained model (LoRA merged), in eval mode.
    """
    from transformers import TrainingArguments

    processor = model.processor
    if processor is None:
        raise ValueError("the model has no processor attached; create it with from_backbone or from_pretrained")
    if check_rows and hasattr(train_dataset, "__len__"):  # every row checked before the first step (a stream cannot be)
        validate_training_rows(train_dataset, query_column, positive_column, negatives_column)
    trained = model
    if lora_rank is not None:
        from peft import LoraConfig, get_peft_model

        target_modules = model.backbone_adapter.lora_target_modules
        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=target_modules)
        trained = get_peft_model(model, config)
        # The new parts are trained fully, as in the reference (peft froze everything else). Found by identity:
        # backbones have modules named "projection" too (InternVL's patch embedding).
        model.meta_tokens.requires_grad_(True)
        if model.projection is not None:
            model.projection.requires_grad_(True)
    arguments = {
        "report_to": "none",
        "save_strategy": "no",
        "ddp_find_unused_parameters": True,  # text-only steps leave the vision tower unused
        **training_arguments,
        "output_dir": output_dir,
        "remove_unused_columns": False,  # the collator reads the raw query / positive / negatives columns
    }
    args = TrainingArguments(**arguments)
    loss_options = {
        "groups": groups,
        "temperature": temperature,
        "group_weights": group_weights,
        "gather_across_devices": args.world_size > 1,
        "processor": processor,
    }
    if cached_mini_batch_size is not None:
        loss = CachedMMRLoss(trained, mini_batch_size=cached_mini_batch_size, **loss_options)
    else:
        loss = MMRLoss(trained, **loss_options)
    collator = MetaEmbedDataCollator(query_column, positive_column, negatives_column)
    trainer = _trainer_class()(
        model=trained,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        loss=loss,
        callbacks=callbacks,
    )
    trainer.train()
    if lora_rank is not None:
        if not merge_lora:
            return trained
        trained = trained.merge_and_unload()
    trained.processor = processor
    if save and trainer.is_world_process_zero():
        trained.save_pretrained(output_dir)
    return trained.eval()
