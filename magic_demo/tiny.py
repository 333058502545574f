"""Small components built in code from configs: the same classes as the real system, tiny sizes.

`build_tiny_components(seed)` gives the seeded random `tiny-random` preset used by the tests. The word-level
tokenizer and the config builders are shared with the miniature (trained) preset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from magic_demo.sampling import make_scheduler

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]  # ids 0..4; eos != 2 keeps CLIP pooling by eos id
PAD_ID, UNK_ID, BOS_ID, EOS_ID, IMAGE_ID = range(5)

# The miniature world's words plus the prompt template's; anything else maps to <unk>.
WORLD_WORDS = (
    "a an the on background moves stays still left right up down "
    "circle square triangle red green blue yellow white purple orange cyan black gray grey navy dark "
    "describe video : , ."
).split()


def build_word_tokenizer(words=WORLD_WORDS) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # Begin/end tokens like the real tokenizers: CLIP pools at the end token.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", padding_side="right")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


@dataclass(frozen=True)
class TinyConfig:
    """Sizes of a tiny system. Defaults: the seeded random test preset."""

    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (8, 8, 8, 8)
    heads: int = 2
    head_dim: int = 16
    rope_axes_dim: tuple[int, int, int] = (4, 6, 6)
    double_layers: int = 1
    single_layers: int = 1
    refiner_layers: int = 1
    text_hidden: int = 16
    text_layers: int = 2
    vision_image_size: int = 32
    vision_patch: int = 8
    clip_hidden: int = 16
    guidance_embeds: bool = False
    patch_size: int = 1
    mlp_ratio: float = 2.0  # feed-forward width / hidden width in the transformer blocks


def build_transformer(cfg: TinyConfig) -> HunyuanVideoTransformer3DModel:
    c = cfg.latent_channels
    return HunyuanVideoTransformer3DModel(
        in_channels=2 * c + 1, out_channels=c, num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
        num_layers=cfg.double_layers, num_single_layers=cfg.single_layers, num_refiner_layers=cfg.refiner_layers,
        mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch_size, patch_size_t=1, guidance_embeds=cfg.guidance_embeds,
        text_embed_dim=cfg.text_hidden, pooled_projection_dim=cfg.clip_hidden, rope_axes_dim=cfg.rope_axes_dim,
        image_condition_type="latent_concat",
    )


def build_vae(cfg: TinyConfig) -> AutoencoderKLHunyuanVideo:
    n = len(cfg.vae_channels)
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=cfg.latent_channels, block_out_channels=cfg.vae_channels, layers_per_block=1,
        down_block_types=("HunyuanVideoDownBlock3D",) * n, up_block_types=("HunyuanVideoUpBlock3D",) * n,
        norm_num_groups=min(4, min(cfg.vae_channels)), spatial_compression_ratio=2 ** (n - 1),
        temporal_compression_ratio=4, mid_block_add_attention=False, scaling_factor=1.0,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return vae


def build_text_encoder(cfg: TinyConfig, vocab_size: int) -> LlavaForConditionalGeneration:
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=2, num_key_value_heads=2,
                       max_position_embeddings=256, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    vision = CLIPVisionConfig(hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden, num_hidden_layers=2,
                              num_attention_heads=2, image_size=cfg.vision_image_size, patch_size=cfg.vision_patch)
    n_patches = (cfg.vision_image_size // cfg.vision_patch) ** 2
    llava = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                        projector_hidden_act="gelu", vision_feature_select_strategy="default",
                        vision_feature_layer=-2, image_seq_length=n_patches)
    return LlavaForConditionalGeneration(llava)


def build_clip_text(cfg: TinyConfig, vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.clip_hidden, intermediate_size=2 * cfg.clip_hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, projection_dim=cfg.clip_hidden))


def build_image_processor(cfg: TinyConfig) -> CLIPImageProcessor:
    size = cfg.vision_image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def build_tiny_components(seed: int = 0, cfg: TinyConfig = TinyConfig()) -> dict:
    """Seeded random components with the real classes (a fresh seed gives the same weights every time)."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer()
    return dict(
        transformer=build_transformer(cfg).eval(),
        vae=build_vae(cfg).eval(),
        text_encoder=build_text_encoder(cfg, len(tokenizer)).eval(),
        tokenizer=tokenizer,
        text_encoder_2=build_clip_text(cfg, len(tokenizer)).eval(),
        tokenizer_2=build_word_tokenizer(),
        image_processor=build_image_processor(cfg),
        scheduler=make_scheduler(),
    )
