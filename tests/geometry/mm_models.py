"""Tiny random vision-language wrappers of the installed ``transformers`` (fp32, built from config).

Their language models use decoder layers that built-in policies know (Llama, Qwen2, Mistral, Gemma, Gemma-3)
while the wrapper's top-level config keeps the text geometry in ``text_config``.

Example:
    >>> type(build("llava")).__name__
    'LlavaForConditionalGeneration'
"""

from __future__ import annotations

import torch
import transformers as T

TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8)


def _vision(cls: type, **extra) -> object:
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
               patch_size=8, **extra)


BUILDERS = {
    "llava": lambda: T.LlavaForConditionalGeneration(T.LlavaConfig(
        text_config=T.LlamaConfig(**TEXT), vision_config=_vision(T.CLIPVisionConfig), image_token_index=127)),
    "llava-qwen2": lambda: T.LlavaForConditionalGeneration(T.LlavaConfig(
        text_config=T.Qwen2Config(**TEXT), vision_config=_vision(T.CLIPVisionConfig), image_token_index=127)),
    "mistral3": lambda: T.Mistral3ForConditionalGeneration(T.Mistral3Config(
        text_config=T.MistralConfig(**TEXT), vision_config=_vision(T.PixtralVisionConfig, head_dim=8),
        image_token_index=127, spatial_merge_size=1)),
    "gemma3": lambda: T.Gemma3ForConditionalGeneration(T.Gemma3Config(
        text_config=T.Gemma3TextConfig(**TEXT, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
        vision_config=_vision(T.SiglipVisionConfig), mm_tokens_per_image=4, image_token_index=127,
        boi_token_index=125, eoi_token_index=126)),
    "paligemma": lambda: T.PaliGemmaForConditionalGeneration(T.PaliGemmaConfig(
        text_config=T.GemmaConfig(**TEXT), vision_config=_vision(T.SiglipVisionConfig), image_token_index=127,
        projection_dim=32)),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The tiny wrapper ``name`` (a key of :data:`BUILDERS`), in eval mode."""
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()
