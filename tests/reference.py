"""Reference implementations the tests compare the library against (not part of the library)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class CrossEntropy(nn.Module):
    """Criterion on materialised logits (the models use the chunked LinearCrossEntropy): summed token
    cross-entropy over labels != ignore_index; returns (sum, count)."""

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, n_classes: int = 0):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.n_classes = n_classes            # >0: only the real vocabulary (smoothing skips padded ids)

    def forward(self, logits, labels):
        if self.n_classes:
            logits = logits[..., :self.n_classes]
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=self.ignore_index,
                               reduction="sum", label_smoothing=self.label_smoothing)
        return loss, (labels != self.ignore_index).sum()


def untie_head(hm) -> None:
    """Gives an in-memory T5ForConditionalGeneration its own lm_head (what from_pretrained does for an
    untied checkpoint; a model built from a T5Config in transformers 5 shares it with the embedding)."""
    if hm.lm_head.weight is hm.shared.weight:
        hm.lm_head.weight = nn.Parameter(hm.shared.weight.detach().clone())


def as_t5_adapter_functions():
    """The T5 adapter's methods under the names the T5 tests use."""
    from model import for_hf_model_type
    from model.t5_hf import ADAPTER as A

    def model_config_from_hf(h):
        return for_hf_model_type(h.model_type).hf.model_config(h)
    return A.from_hf_state_dict, A.hf_config, A.key_map, A.tied, model_config_from_hf, A.to_hf_state_dict
