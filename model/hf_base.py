"""The one interface of an architecture's Hugging Face adapter (one subclass per architecture).

An adapter holds the explicit key map between our parameter names and the transformers class's
tensor names (import uses it inverted, so the two directions cannot disagree), the config both
ways, which HF tensors are copies of the embedding (tied) or functions of the config (fixed), and
the checks of a folder beyond what the key map can see. Weights are renamed, never recomputed:
HF -> encdec -> HF is bitwise.

Vocabulary: HF folders hold `hf_vocab_size` embedding rows (ModelConfig.hf_vocab_size); our model
may hold more (padded to vocab_multiple and the TP degree). Exports cut the rows of vocab_rows()
back, imports pad them with zeros (launcher/checkpoint/reshard.py, for every parameter vocab_rows()
names), so every vocabulary size round-trips; a run started from a folder records its row count
as model.export_vocab_size (launcher/checkpoint/vocab.py).
"""
from __future__ import annotations

from typing import Callable

import torch

from model.config import ModelConfig


class HFAdapter:
    model_types: tuple[str, ...] = ()       # HF config.model_type values this adapter reads

    # ---- names
    def class_name(self, c: ModelConfig) -> str:
        raise NotImplementedError

    def key_map(self, c: ModelConfig) -> dict[str, str]:
        """Every parameter name of ours -> its Hugging Face tensor name."""
        raise NotImplementedError

    def hf_to_ours(self, c: ModelConfig) -> dict[str, str]:
        return {theirs: ours for ours, theirs in self.key_map(c).items()}

    def fixed_tensors(self, c: ModelConfig) -> dict[str, torch.Tensor]:
        """HF tensors that are functions of the config (position tables, logit biases): written on export."""
        return {}

    def tied(self, c: ModelConfig) -> tuple[str, ...]:
        """HF tensors that are copies of the token embedding (dropped on import, checked equal)."""
        return ()

    def ignored(self, c: ModelConfig) -> tuple[str, ...]:
        """HF tensors the transformers class itself ignores on load."""
        return ()

    def vocab_rows(self, c: ModelConfig) -> tuple[str, ...]:
        """Our parameter names whose dim 0 is the vocabulary (cut to hf_vocab_size on export)."""
        return ("embed.weight",)

    # ---- configs
    def hf_config(self, c: ModelConfig, max_length: int = 256):
        """A stock transformers config computing the same function as c."""
        raise NotImplementedError

    def config_json_overrides(self, c: ModelConfig) -> dict:
        """Keys written into config.json over the transformers config's own (for other versions' readers)."""
        return {}

    def model_config(self, hcfg) -> ModelConfig:
        """HF config -> ours; ValueError names the first field we cannot represent."""
        raise NotImplementedError

    def folder_config(self, hcfg, written: dict) -> ModelConfig:
        """A folder's config -> ours: as model_config, where `written` (its config.json as written,
        json) says what transformers' parsing of another version's file hides (T5's head rescale)."""
        return self.model_config(hcfg)

    def check_folder(self, where: str, hcfg, mc: ModelConfig, names: set[str],
                     tensor: Callable[[str], torch.Tensor]) -> ModelConfig:
        """What the key map cannot see, checked on the folder's tensors (`names`, read with
        `tensor(name)`); -> mc, completed from them. Raises ValueError with a whole message."""
        return mc

    # ---- tensors
    def to_hf_state_dict(self, sd: dict, c: ModelConfig) -> dict:
        """Our (unsharded) parameters -> HF tensors (fp32), plus the fixed tensors HF keeps."""
        keys, rows = self.key_map(c), c.hf_vocab_size
        out = {keys[k]: (v[:rows] if k in self.vocab_rows(c) else v) for k, v in sd.items()}
        out.update(self.fixed_tensors(c))
        return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}

    def from_hf_state_dict(self, hf: dict, c: ModelConfig) -> dict:
        """HF tensors -> ours (tied, fixed and ignored ones dropped); KeyError names an unknown tensor."""
        return rename_from_hf(hf, self.hf_to_ours(c),
                              set(self.tied(c)) | set(self.fixed_names(c)) | set(self.ignored(c)))

    def fixed_names(self, c: ModelConfig) -> tuple[str, ...]:
        return tuple(self.fixed_tensors(c))


def rename_from_hf(hf: dict, names: dict[str, str], skip) -> dict:
    """HF tensors -> ours through an inverted key map; tensors in `skip` are dropped; a name the map
    does not know raises KeyError naming it."""
    out = {}
    for k, v in hf.items():
        if k in skip:
            continue
        if k not in names:
            raise KeyError(f"unexpected Hugging Face parameter '{k}'")
        out[names[k]] = v
    return out
