"""The frozen base model's own cost: Liger-kernel's Triton kernels where they apply.

At Qwen shapes the frozen model, not the adapter, is most of a training step: its RMSNorms,
SwiGLU MLPs and rotary embeddings, and above all the output layer, whose 151,936-word logits
for every position are the largest tensor of the step. `apply_base_kernels` swaps in Liger's
RMSNorm, SwiGLU and RoPE on the model instance (``training.base_kernels``: ``auto`` on CUDA where
liger-kernel is installed and knows the model type), and `answer_loss_sum` computes the loss
from the answer positions' hidden states alone, with Liger's fused linear cross-entropy when the
kernels are on: the logits are never materialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from .evaluate import token_loss_sum

# Causal LMs whose logits are their output layer applied to the decoder's last hidden state,
# nothing more (no soft-capping, no logit scale): for them the loss can skip the full logits.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def liger_supports(model) -> bool:
    """Whether liger-kernel is installed and has kernels for ``model``'s type."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    return getattr(model.config, "model_type", None) in MODEL_TYPE_TO_APPLY_LIGER_FN


def apply_base_kernels(model, setting: str, device: torch.device) -> bool:
    """Liger's RMSNorm, SwiGLU and RoPE on ``model`` when ``setting`` asks for them ("auto": on
    CUDA when liger-kernel supports the model); returns whether they are on. Liger's rotary
    embedding replaces the model type's function for the whole process, as Liger does: the
    worker of a CUDA device class trains on CUDA only."""
    if setting == "none" or (setting == "auto" and (device.type != "cuda" or not liger_supports(model))):
        return False
    if device.type != "cuda":
        raise ValueError("training.base_kernels 'liger' needs CUDA: Liger's kernels are written for GPUs")
    if not liger_supports(model):
        raise ValueError(f"training.base_kernels 'liger': liger-kernel is not installed or has no kernels for "
                         f"model type {getattr(model.config, 'model_type', None)!r}")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    # The loss is ours (answer_loss_sum), so the model's forward stays as it is.
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return True


def answer_loss_sum(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    fused_cross_entropy: bool = False) -> torch.Tensor:
    """`token_loss_sum` of the model's logits, computed from the answer positions' hidden states
    only (the output layer on those rows alone), or with Liger's fused linear cross-entropy
    (chunked: no logits at all). Models whose head is more than a linear layer take the full
    logits."""
    head = model.get_output_embeddings()
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES or head is None:
        return token_loss_sum(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    answer = targets != IGNORE_INDEX
    states, targets = hidden[:, :-1][answer], targets[answer]
    if fused_cross_entropy and type(head) is nn.Linear and head.bias is None:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        return LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, states, targets)
    return F.cross_entropy(head(states).float(), targets, reduction="sum")
