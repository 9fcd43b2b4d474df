"""Fine-tuning a pretrained GPT-2: the data and losses of the book's chapters 6 and 7.

* `classify_data`: SMS spam classification (chapter 6): balanced, split 70/10/20, padded.
* `instruct_data`: instruction following (chapter 7): Alpaca prompts, padded and masked batches.
* `preference_data`: chosen / rejected pairs for DPO (chapter 7's DPO notebook).
* `classify`: a classifier head, the book's freezing, last-token loss and accuracy.
* `dpo`: the DPO loss and the sequence log-probabilities it compares.
* `sources`: where the three data files come from (downloaded once, checked by SHA-256).

The engine parts they rely on live in minigrad: freezing (`Module.requires_grad_`,
`trainable_parameters`), LoRA (`minigrad.lora`) and log-probabilities (`minigrad.logprob`).
"""

from .classify import (
    add_classifier_head,
    classification_loss,
    evaluate_classifier,
    freeze_for_classification,
    last_token_logits,
)
from .classify_data import ClassificationSplits, LabelledTokens, classification_loader, load_spam_splits
from .dpo import DPOLoss, dpo_batch_loss, dpo_loss, response_logprobs
from .instruct_data import (
    InstructionDataset,
    collate_instructions,
    format_input,
    format_response,
    instruction_loader,
    load_instruction_data,
    split_instruction_data,
)
from .preference_data import (
    PreferenceDataset,
    SequenceBatch,
    collate_preferences,
    load_preference_data,
    preference_loader,
)
from .sources import FINETUNE_FILES, finetune_file

__all__ = [
    "FINETUNE_FILES", "ClassificationSplits", "DPOLoss", "InstructionDataset", "LabelledTokens",
    "PreferenceDataset", "SequenceBatch", "add_classifier_head", "classification_loader",
    "classification_loss", "collate_instructions", "collate_preferences", "dpo_batch_loss",
    "dpo_loss", "evaluate_classifier", "finetune_file", "format_input", "format_response",
    "freeze_for_classification", "instruction_loader", "last_token_logits", "load_instruction_data",
    "load_preference_data", "load_spam_splits", "preference_loader", "response_logprobs",
    "split_instruction_data",
]
