"""A tiny random Stable Diffusion pipeline, for tests of the diffusers engine.

Public for tests (this plugin's and dmr's): `build_tiny_pipeline(folder)` writes a
pipeline built from configs (UNet blocks (8, 16), VAE [8, 16], CLIP text hidden 32)
with `save_pretrained`, so the runner loads it exactly as it loads a real model;
`pack_dduf` turns it into one DDUF archive. 4 steps at 64x64 take a fraction of a
second on CPU. No pytest dependency; torch, diffusers and transformers are imported
inside `build_tiny_pipeline` only, so importing this module (conftests do, at
collection) costs nothing.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

__all__ = ["build_tiny_pipeline", "pack_dduf"]

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 bytes (what the BPE vocab spells)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def _write_tokenizer(folder: Path) -> int:
    """A byte-level CLIP vocabulary with no merges: every prompt tokenises, one token
    per byte. transformers 5 ignores `vocab_file=`, so the files come first."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet] + list(SPECIAL_TOKENS)
    (folder / "vocab.json").write_text(json.dumps({token: n for n, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(tokens)


def build_tiny_pipeline(folder: Path) -> Path:
    """Write a random tiny Stable Diffusion pipeline to `folder` (a diffusers directory:
    model_index.json and one folder per component) and return `folder`."""
    with warnings.catch_warnings():
        # The libraries' deprecation notices while building are no failure of the
        # engine's (test suites turn warnings into errors).
        warnings.simplefilter("ignore")
        _write_pipeline(folder)
    return folder


def pack_dduf(pipeline_dir: Path, target: Path) -> Path:
    """`pipeline_dir` (a diffusers directory) as one DDUF archive at `target`."""
    from huggingface_hub import export_folder_as_dduf

    export_folder_as_dduf(target, pipeline_dir)
    return target


def _write_pipeline(folder: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=4,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    staging = folder.parent / (folder.name + ".tokenizer")
    vocab_size = _write_tokenizer(staging)
    tokenizer = CLIPTokenizer.from_pretrained(staging, model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=vocab_size,
            max_position_embeddings=77,
        )
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # mypy reads diffusers' placeholder class (its __init__ offers one for installs
    # without torch), which has no methods; the real pipeline has save_pretrained.
    pipeline.save_pretrained(folder, safe_serialization=True)  # type: ignore[attr-defined]
