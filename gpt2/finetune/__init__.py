"""Fine-tuning a pretrained GPT-2: the data and losses of the book's chapters 6 and 7.

* `classify_data`: SMS spam classification (chapter 6): balanced, split 70/10/20, padded.
* `instruct_data`: instruction following (chapter 7): Alpaca prompts, padded and masked batches.
* `preference_data`: chosen / rejected pairs for DPO (chapter 7's DPO notebook).
* `classify`: a classifier head, the book's freezing, last-token loss and accuracy.
* `dpo`: the DPO loss and the sequence log-probabilities it compares.
* `sources`: where the three data files come from (downloaded once, checked by SHA-256).
* `adapt`: dropout, LoRA, what trains, DPO's frozen reference, the prompt template to record.
* `tasks`: the three tasks on gpt2.train.train (loaders, loss, evaluation, the end of a run);
  `python -m gpt2 finetune` (gpt2/cli/finetune.py) is a thin layer over them.
* `responses`: an instruction-tuned model's answers to the test set, saved as the book does.

The engine parts they rely on live in minigrad: freezing (`Module.requires_grad_`,
`trainable_parameters`), LoRA (`minigrad.lora`) and log-probabilities (`minigrad.logprob`).
"""

from .adapt import (
    TRAINABLE,
    add_lora,
    freeze,
    frozen_copy,
    lora_targets,
    merge_lora_into,
    set_dropout,
    weights_sha256,
    with_template,
)
from .classify import (
    add_classifier_head,
    classification_evaluation,
    classification_loss,
    classify_text,
    evaluate_classifier,
    freeze_for_classification,
    last_token_logits,
)
from .classify_data import ClassificationSplits, LabelledTokens, classification_loader, load_spam_splits
from .dpo import DPOLoss, DPOObjective, dpo_batch_loss, dpo_loss, dpo_stacked_loss, response_logprobs
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
from .responses import RESPONSES_FILE, generate_response, generate_responses, write_responses
from .sources import FINETUNE_FILES, finetune_file
from .tasks import BOOK_DEFAULTS, TASKS, ClassifyTask, DPOTask, EpochAccuracy, InstructTask, Task, make_task

__all__ = [
    "BOOK_DEFAULTS", "FINETUNE_FILES", "RESPONSES_FILE", "TASKS", "TRAINABLE", "ClassificationSplits",
    "ClassifyTask", "DPOLoss", "DPOObjective", "DPOTask", "EpochAccuracy", "InstructTask",
    "InstructionDataset", "LabelledTokens", "PreferenceDataset", "SequenceBatch", "Task",
    "add_classifier_head", "add_lora", "classification_evaluation", "classification_loader",
    "classification_loss", "classify_text", "collate_instructions", "collate_preferences",
    "dpo_batch_loss", "dpo_loss", "dpo_stacked_loss", "evaluate_classifier", "finetune_file",
    "format_input", "format_response", "freeze", "freeze_for_classification", "frozen_copy",
    "generate_response", "generate_responses", "instruction_loader", "last_token_logits",
    "load_instruction_data", "load_preference_data", "load_spam_splits", "lora_targets", "make_task",
    "merge_lora_into", "preference_loader", "response_logprobs", "set_dropout", "split_instruction_data",
    "weights_sha256", "with_template", "write_responses",
]
