"""ldm.convert: diffusers' UNet2DConditionModel / AutoencoderKL <-> our UNet / VAE, in float64.

diffusers is a test-only dependency; the converter itself never imports it. Every parameter is
re-drawn before a comparison (zero-initialised output layers would hide a wrong map).
"""

import json
import math
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from autoencoder import VAE, VAE_CONFIGS, VAEConfig
from ldm import convert, sd_folder
from ldm.pretrained import load_unet
from ldm.sd_folder import DiffusersPipeline, load_diffusers_pipeline, schedule_from_config
from ldm.sd_format import (
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)
from ldm.checkpoint import save_model
from ldm.pretrained import load_vae
from ldm.unet import UNET_CONFIGS, UNet, UNetConfig, count_parameters, unet_config

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
TOL = 1e-10  # float64 on both sides: the measured errors are ~1e-15 (the issue asks for < 1e-6)
SD15_UNET_PARAMETERS = 859_520_964  # diffusers' count for SD 1.x's UNet
SD_VAE_PARAMETERS = 83_653_863  # and for its VAE

# Stable Diffusion 1.5's unet/config.json (the fields its file holds; the rest are diffusers' defaults)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1)
SD_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              latent_channels=4, norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215)
# SD 1.5's scheduler/scheduler_config.json
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")

# Small configurations of the same block structure, each exercising other parts of the map.
SMALL_UNETS = {
    # SD 1.x: 1x1-conv projections, cross-attention on all but the deepest level; two transformer blocks
    "sd1-layout": dict(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2,
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                       cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8,
                       transformer_layers_per_block=2),
    # SD 2.x style: linear projections, attention only deep, heads given per block, 5 input channels
    "linear-proj": dict(sample_size=8, in_channels=5, out_channels=3, block_out_channels=(16, 32),
                        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=12,
                        attention_head_dim=[4, 4], norm_num_groups=4, use_linear_projection=True),
}
SMALL_VAES = {
    "f4": dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
               down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
               scaling_factor=0.5),
    "f2-2blocks": dict(block_out_channels=(8, 16), layers_per_block=2, latent_channels=3, norm_num_groups=4,
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
}


# ---------------------------------------------------------------- helpers
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def redraw_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Every parameter random and non-zero, drawn in place: weights of std 1/sqrt(fan_in), norm scales
    1 +- 0.1, the rest of std 0.1, so activations keep their size through the depth and no layer is left
    at zero. Uniform draws: six times faster than normal ones for the 860M float64 parameters."""
    for name, p in model.named_parameters():
        if p.dim() > 1:
            std, mean = 1 / math.sqrt(p[0].numel()), 0.0
        else:
            std, mean = 0.1, (1.0 if "norm" in name and name.endswith("weight") else 0.0)
        half_width = math.sqrt(3) * std  # U(-a, a) has std a / sqrt(3)
        p.uniform_(mean - half_width, mean + half_width, generator=generator)
    return model


class Float64Timesteps(nn.Module):
    """diffusers' sinusoidal timestep features (flip_sin_to_cos, freq_shift 0), in float64. diffusers
    computes them in float32 whatever the model's dtype, ~1e-6 relative off the float64 values; this
    stand-in keeps the whole reference in float64."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=F64) / half)  # (half,)
        args = t.to(F64)[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def diffusers_unet(cfg: dict, generator: torch.Generator, float64_time: bool = True):
    model = redraw_(diffusers.UNet2DConditionModel(**cfg).to(F64).eval(), generator)
    if float64_time:
        model.time_proj = Float64Timesteps(cfg["block_out_channels"][0])
    return model


def diffusers_vae(cfg: dict, generator: torch.Generator):
    return redraw_(diffusers.AutoencoderKL(**cfg).to(F64).eval(), generator)


def build(cls, config, state):
    """Our model holding ``state``'s tensors (no copies), as the converter builds it."""
    return sd_folder._assemble(cls, config, state)


def convert_model(theirs: nn.Module, cls, config_from, state_from):
    """diffusers model -> (our config, their state dict, our model sharing their tensors); equal counts."""
    config = config_from(dict(theirs.config))
    their_state = theirs.state_dict()
    ours = build(cls, config, state_from(their_state, config))
    assert count_parameters(ours) == sum(p.numel() for p in theirs.parameters())
    return config, their_state, ours


def unet_inputs(cfg: dict, generator: torch.Generator, size: int = 8, tokens: int = 7, batch: int = 2):
    x = torch.randn(batch, cfg.get("in_channels", 4), size, size, generator=generator, dtype=F64)
    t = torch.tensor([917.0, 3.0][:batch], dtype=F64)  # a late and an early timestep
    context = torch.randn(batch, tokens, cfg["cross_attention_dim"], generator=generator, dtype=F64)
    return x, t, context


def unet_outputs(theirs, ours, x, t, context):
    with torch.no_grad():
        return theirs(x, t, encoder_hidden_states=context).sample, ours(x, t, context)


def vae_outputs(theirs, ours, x, z):
    with torch.no_grad():
        ref_post, post = theirs.encode(x).latent_dist, ours.encode(x)
        return (ref_post.mean, ref_post.logvar, theirs.decode(z).sample), (post.mean, post.logvar, ours.decode(z))


def clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary small enough to write here: the 256 byte symbols, each also as a word end,
    a few merges, the two special tokens."""
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    merges = [("r", "e"), ("e", "d</w>"), ("c", "u"), ("cu", "b"), ("cub", "e</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


TINY_SD_UNET = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                    attention_head_dim=4, norm_num_groups=8)
TINY_SD_VAE = SMALL_VAES["f4"]


def make_tiny_sd_folder(path: Path, seed: int, scheduler: str = "pndm") -> Path:
    """A complete Stable Diffusion 1.x folder in diffusers layout, small and random: unet/, vae/,
    scheduler/ (SD 1.5's PNDM settings, or DDIM), a CLIP text_encoder/ and a tokenizer/ that load
    offline, model_index.json. 8 x 8 latents of 32 x 32 images, 32-wide text tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    g = torch.Generator().manual_seed(seed)
    vocab, merges = clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=TINY_SD_UNET["cross_attention_dim"], intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"])).eval()
    kind = {"pndm": diffusers.PNDMScheduler, "ddim": diffusers.DDIMScheduler}[scheduler]
    settings = dict(SD15_SCHEDULER) if scheduler == "pndm" else dict(
        beta_schedule="linear", beta_start=0.0002, beta_end=0.03, num_train_timesteps=800,
        prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        unet=redraw_(diffusers.UNet2DConditionModel(**TINY_SD_UNET), g),
        vae=redraw_(diffusers.AutoencoderKL(**TINY_SD_VAE), g), text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=kind(**settings), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


# ---------------------------------------------------------------- small configurations, float64
@pytest.mark.parametrize("name", list(SMALL_UNETS))
def test_unet_matches_diffusers_and_round_trips(name, seed):
    cfg = SMALL_UNETS[name]
    g = torch.Generator().manual_seed(seed)
    theirs = diffusers_unet(cfg, g)
    config, their_state, ours = convert_model(theirs, UNet, unet_config_from_diffusers, unet_from_diffusers)
    x, t, context = unet_inputs(cfg, g)
    ref, out = unet_outputs(theirs, ours, x, t, context)
    err = rel_err(out, ref)
    print(f"{name}: UNet relative error {err:.2e}")
    assert out.shape == ref.shape and err < TOL

    # diffusers' own float32 timestep features are the only difference without the float64 stand-in
    theirs_f32_time = theirs.time_proj
    theirs.time_proj = diffusers.models.embeddings.Timesteps(cfg["block_out_channels"][0], True, 0)
    ref32, _ = unet_outputs(theirs, ours, x, t, context)
    assert rel_err(out, ref32) < 1e-4
    theirs.time_proj = theirs_f32_time

    # the way back: the exported state loads strictly into a fresh diffusers model, tensor for tensor
    back = unet_to_diffusers(ours.state_dict(), config, cfg.get("use_linear_projection", False))
    assert set(back) == set(their_state)
    assert all(torch.equal(back[k], their_state[k]) for k in their_state)
    fresh = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(config, cfg["sample_size"], {
        "use_linear_projection": cfg.get("use_linear_projection", False)})).to(F64).eval()
    fresh.load_state_dict(back, strict=True)
    fresh.time_proj = Float64Timesteps(cfg["block_out_channels"][0])
    with torch.no_grad():
        assert rel_err(fresh(x, t, encoder_hidden_states=context).sample, out) < TOL


@pytest.mark.parametrize("name", list(SMALL_VAES))
def test_vae_matches_diffusers_and_round_trips(name, seed):
    cfg = SMALL_VAES[name]
    g = torch.Generator().manual_seed(seed)
    theirs = diffusers_vae(cfg, g)
    config, their_state, ours = convert_model(theirs, VAE, vae_config_from_diffusers, vae_from_diffusers)
    f = config.downsample_factor
    x = torch.rand(2, 3, 8 * f, 8 * f, generator=g, dtype=F64) * 2 - 1
    z = torch.randn(2, config.latent_channels, 8, 8, generator=g, dtype=F64)
    refs, outs = vae_outputs(theirs, ours, x, z)
    errs = [rel_err(o, r) for o, r in zip(outs, refs)]
    print(f"{name}: VAE relative errors mean {errs[0]:.2e}, logvar {errs[1]:.2e}, decode {errs[2]:.2e}")
    assert all(e < TOL for e in errs)

    back = vae_to_diffusers(ours.state_dict(), config)
    assert set(back) == set(their_state) and all(torch.equal(back[k], their_state[k]) for k in their_state)
    fresh = diffusers.AutoencoderKL(**vae_config_to_diffusers(config, cfg.get("scaling_factor", 0.18215))).to(F64)
    fresh.load_state_dict(back, strict=True)
    assert rel_err(fresh.eval().decode(z).sample.detach(), outs[2]) < TOL


def test_vae_reads_old_attention_names_and_1x1_conv_shapes(seed):
    """Files from diffusers < 0.14 name the mid attention query / key / value / proj_attn; files converted
    from the CompVis checkpoints hold its weights as 1x1 convolutions (C, C, 1, 1)."""
    cfg = SMALL_VAES["f4"]
    theirs = diffusers_vae(cfg, torch.Generator().manual_seed(seed))
    config = vae_config_from_diffusers(dict(theirs.config))
    state = theirs.state_dict()
    new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in state.items():
        for now, before in new.items():
            if f"attentions.0.{now}." in k:
                k = k.replace(f".{now}.", f".{before}.")
                v = v[:, :, None, None] if v.dim() == 2 else v
        old[k] = v
    assert any(".proj_attn.weight" in k for k in old)
    converted, reference = vae_from_diffusers(old, config), vae_from_diffusers(state, config)
    assert set(converted) == set(reference) and all(torch.equal(converted[k], reference[k]) for k in reference)
    both = {**state, "encoder.mid_block.attentions.0.query.weight": state["encoder.mid_block.attentions.0.to_q.weight"]}
    with pytest.raises(ValueError, match=r"both encoder\.mid_block\.attentions\.0\.query\.weight and .*to_q\.weight"):
        vae_from_diffusers(both, config)


# ---------------------------------------------------------------- the full SD 1.x shapes
def sd_unet_meta():
    with torch.device("meta"):
        return diffusers.UNet2DConditionModel(**SD15_UNET).to(F64)


@pytest.mark.slow
def test_sd15_unet_full_size(seed):
    """The sd15 preset against diffusers' SD 1.x UNet: random float64 weights, one forward at 8 x 8
    latents. Ours takes diffusers' tensors without copies (only q/k/v are stacked), and diffusers' model
    is dropped before ours runs, so one copy of the 860M parameters (6.9 GB) is alive at a time."""
    g = torch.Generator().manual_seed(seed)
    theirs = redraw_(sd_unet_meta().to_empty(device="cpu").eval(), g)
    theirs.time_proj = Float64Timesteps(SD15_UNET["block_out_channels"][0])
    n_theirs = sum(p.numel() for p in theirs.parameters())
    config = unet_config_from_diffusers(dict(theirs.config))
    assert config == UNET_CONFIGS["sd15"]
    x, t, context = unet_inputs(SD15_UNET, g, size=8, tokens=77, batch=1)
    with torch.no_grad():
        ref = theirs(x, t, encoder_hidden_states=context).sample
    state = unet_from_diffusers(theirs.state_dict(), config)
    shared = theirs.conv_in.weight.data_ptr()
    del theirs
    ours = build(UNet, config, state)
    del state
    assert ours.conv_in.weight.data_ptr() == shared  # the converter moved the tensors, it did not copy them
    n_ours = count_parameters(ours)
    with torch.no_grad():
        out = ours(x, t, context)
    err = rel_err(out, ref)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"sd15 UNet: {n_ours:,} parameters ours, {n_theirs:,} diffusers; relative error {err:.2e}; "
          f"process peak RSS {peak_gb:.1f} GB")
    assert n_ours == n_theirs == SD15_UNET_PARAMETERS
    assert err < TOL

    # the way back at full size: diffusers' names and shapes, and the same tensors once read again
    back = unet_to_diffusers(ours.state_dict(), config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in sd_unet_meta().state_dict().items()}
    again = unet_from_diffusers(back, config)
    assert all(torch.equal(again[k], v) for k, v in ours.state_dict().items())


@pytest.mark.slow
def test_sd_vae_full_size(seed):
    g = torch.Generator().manual_seed(seed)
    theirs = diffusers_vae(SD_VAE, g)
    config, _, ours = convert_model(theirs, VAE, vae_config_from_diffusers, vae_from_diffusers)
    assert config == VAE_CONFIGS["sd"]
    x = torch.rand(1, 3, 64, 64, generator=g, dtype=F64) * 2 - 1
    z = torch.randn(1, 4, 8, 8, generator=g, dtype=F64)
    refs, outs = vae_outputs(theirs, ours, x, z)
    errs = [rel_err(o, r) for o, r in zip(outs, refs)]
    n_theirs = sum(p.numel() for p in theirs.parameters())
    print(f"sd VAE: {count_parameters(ours):,} parameters ours, {n_theirs:,} diffusers; relative errors "
          f"mean {errs[0]:.2e}, logvar {errs[1]:.2e}, decode {errs[2]:.2e}")
    assert count_parameters(ours) == n_theirs == SD_VAE_PARAMETERS
    assert all(e < TOL for e in errs)
    back, their_state = vae_to_diffusers(ours.state_dict(), config), theirs.state_dict()
    assert set(back) == set(their_state) and all(torch.equal(back[k], their_state[k]) for k in their_state)


def test_sd_configs_translate_both_ways():
    """SD 1.5's config.json files give our sd15 / sd presets, and the presets give them back."""
    assert unet_config_from_diffusers(SD15_UNET) == UNET_CONFIGS["sd15"]
    exported = unet_config_to_diffusers(UNET_CONFIGS["sd15"], sample_size=64)
    assert {k: exported[k] for k in SD15_UNET} == {k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in SD15_UNET.items()}
    assert vae_config_from_diffusers(SD_VAE) == VAE_CONFIGS["sd"]
    exported = vae_config_to_diffusers(VAE_CONFIGS["sd"], 0.18215, sample_size=512)
    assert {k: exported[k] for k in SD_VAE} == {k: list(v) if isinstance(v, tuple) else v for k, v in SD_VAE.items()}


# ---------------------------------------------------------------- folders and commands
def test_folder_conversion_both_ways(tmp_path, seed):
    """SD folder -> ``python -m ldm.convert from-diffusers`` -> our files -> ``to-diffusers`` -> a folder
    that diffusers' from_pretrained opens, holding the very same tensors."""
    src = make_tiny_sd_folder(tmp_path / "sd", seed)
    ours_dir, back_dir = tmp_path / "ours", tmp_path / "back"
    run = subprocess.run([sys.executable, "-m", "ldm.convert", "from-diffusers", str(src), "--out", str(ours_dir)],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr

    meta = json.loads((ours_dir / "unet.json").read_text())
    assert meta["prediction"] == "eps" and meta["latent_shape"] == [4, 8, 8] and meta["resolution"] == 32
    assert meta["schedule"] == {k: SD15_SCHEDULER[k] for k in ("beta_schedule", "beta_start", "beta_end",
                                                               "num_train_timesteps")}
    assert Path(meta["text_encoder"]["path"]) == (src / "text_encoder").resolve()
    assert meta["cfg_scale"] == 7.5 and meta["created_by"] == "ldm.convert from-diffusers"
    assert meta["text_encoder_options"] == {"pad_to_max": True, "mask_padding": False, "max_tokens": 77}
    vae, vae_meta = load_vae(ours_dir)
    assert vae_meta["latent_scale_factor"] == TINY_SD_VAE["scaling_factor"] and vae_meta["latent_mean"] == 0.0
    assert vae_meta["latent_shape"] == [4, 8, 8] and vae_meta["downsample_factor"] == 4
    unet, _ = load_unet(ours_dir)

    # the converted files compute what the diffusers folder computes (float32 files, float64 run)
    g = torch.Generator().manual_seed(seed)
    theirs_unet = diffusers.UNet2DConditionModel.from_pretrained(src / "unet").to(F64).eval()
    theirs_unet.time_proj = Float64Timesteps(TINY_SD_UNET["block_out_channels"][0])
    ref, out = unet_outputs(theirs_unet, unet.to(F64), *unet_inputs(TINY_SD_UNET, g))
    assert rel_err(out, ref) < TOL
    theirs_vae = diffusers.AutoencoderKL.from_pretrained(src / "vae").to(F64).eval()
    x = torch.rand(1, 3, 32, 32, generator=g, dtype=F64) * 2 - 1
    z = torch.randn(1, 4, 8, 8, generator=g, dtype=F64)
    refs, outs = vae_outputs(theirs_vae, vae.to(F64), x, z)
    assert all(rel_err(o, r) < TOL for o, r in zip(outs, refs))

    assert convert.main(["to-diffusers", str(ours_dir), "--out", str(back_dir)]) == 0
    for sub, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
        original, exported = cls.from_pretrained(src / sub), cls.from_pretrained(back_dir / sub)
        a, b = original.state_dict(), exported.state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), sub
        differ = {k for k in original.config if not k.startswith("_") and original.config[k] != exported.config[k]}
        assert not differ, f"{sub} config differs in {differ}"
    exported = json.loads((back_dir / "scheduler" / "scheduler_config.json").read_text())
    theirs_sched = diffusers.PNDMScheduler.from_pretrained(src / "scheduler")
    back_sched = diffusers.DDIMScheduler.from_pretrained(back_dir / "scheduler")
    assert exported["prediction_type"] == "epsilon" and back_sched.config.clip_sample is False
    assert torch.equal(back_sched.alphas_cumprod, theirs_sched.alphas_cumprod)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(back_dir)  # model_index.json, text encoder, tokenizer
    assert isinstance(pipe.text_encoder, transformers.CLIPTextModel) and pipe.tokenizer("a red cube").input_ids


def test_weights_trained_here_open_in_diffusers(tmp_path, seed):
    """What the training scripts export (save_model: our schedule name, v prediction, no sample size in
    unet.json, the VAE in another folder) -> to-diffusers -> diffusers computes what ours computes."""
    g = torch.Generator().manual_seed(seed)
    vae_config = VAE_CONFIGS["tiny"]
    latents = vae_config.latent_channels
    config = UNetConfig(in_channels=latents, out_channels=latents, model_channels=16, channel_mult=(1, 2),
                        num_res_blocks=1, attention_levels=(1,), num_heads=2, context_dim=12, norm_groups=4)
    unet = redraw_(UNet(config), g)
    save_model(tmp_path / "run", "unet", unet, config, prediction="v", schedule="cosine", text_encoder=None)
    vae = redraw_(VAE(vae_config), g)
    save_model(tmp_path / "vae_run", "vae", vae, vae_config, latent_scale_factor=0.7, latent_mean=0.0,
               resolution=32, downsample_factor=4, latent_shape=[latents, 8, 8])
    out = tmp_path / "exported"
    assert convert.main(["to-diffusers", str(tmp_path / "run"), "--vae", str(tmp_path / "vae_run"),
                         "--out", str(out)]) == 0
    assert not (out / "model_index.json").exists()  # no CLIP text encoder to ship with it
    theirs = diffusers.UNet2DConditionModel.from_pretrained(out / "unet").to(F64).eval()
    assert theirs.config.sample_size == 8
    theirs.time_proj = Float64Timesteps(16)
    ref, mine = unet_outputs(theirs, unet.to(F64).eval(),
                             *unet_inputs({"cross_attention_dim": 12, "in_channels": latents}, g))
    assert rel_err(mine, ref) < TOL
    their_vae = diffusers.AutoencoderKL.from_pretrained(out / "vae").to(F64).eval()
    assert their_vae.config.scaling_factor == 0.7 and their_vae.config.sample_size == 32
    x = torch.rand(1, 3, 32, 32, generator=g, dtype=F64) * 2 - 1
    z = torch.randn(1, latents, 8, 8, generator=g, dtype=F64)
    refs, outs = vae_outputs(their_vae, vae.to(F64).eval(), x, z)
    assert all(rel_err(o, r) < TOL for o, r in zip(outs, refs))
    scheduler = diffusers.DDIMScheduler.from_pretrained(out / "scheduler")
    assert scheduler.config.prediction_type == "v_prediction"
    assert torch.allclose(scheduler.alphas_cumprod.to(F64), schedule_from_config("cosine").alphas_cumprod, rtol=2e-5)


def test_sharded_and_variant_weights_are_read(tmp_path, seed):
    theirs = diffusers_unet(SMALL_UNETS["linear-proj"], torch.Generator().manual_seed(seed), float64_time=False)
    state = {k: v.clone() for k, v in theirs.state_dict().items()}  # float64
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    theirs.to(torch.float16).save_pretrained(tmp_path / "half", variant="fp16")
    ours, _ = sd_folder.load_diffusers_unet(tmp_path / "sharded", dtype=None)  # the stored precision
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in unet_from_diffusers(state, ours.config).items())
    with pytest.raises(FileNotFoundError, match=r"variants present: diffusion_pytorch_model\.fp16\.safetensors"):
        sd_folder.load_diffusers_unet(tmp_path / "half")
    half, _ = sd_folder.load_diffusers_unet(tmp_path / "half", variant="fp16", dtype=torch.float32)
    assert half.conv_out.weight.dtype == torch.float32
    assert torch.equal(half.conv_out.weight, state["conv_out.weight"].half().float())


def test_load_diffusers_pipeline(tmp_path, seed):
    src = make_tiny_sd_folder(tmp_path / "sd", seed, scheduler="ddim")
    pipe = load_diffusers_pipeline(src)
    assert isinstance(pipe, DiffusersPipeline)
    assert pipe.prediction == "v" and pipe.resolution == 32 and pipe.latent_scale_factor == 0.5
    assert pipe.text_encoder_path == src / "text_encoder"
    assert not pipe.unet.training and not pipe.vae.training
    assert not any(p.requires_grad for p in [*pipe.unet.parameters(), *pipe.vae.parameters()])
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    theirs = diffusers.DDIMScheduler.from_pretrained(src / "scheduler")
    assert pipe.schedule.num_timesteps == 800
    assert torch.allclose(pipe.schedule.alphas_cumprod, theirs.alphas_cumprod.to(F64), rtol=1e-5, atol=0)
    # the weights are diffusers', in the dtype asked for
    half = load_diffusers_pipeline(src, dtype=torch.bfloat16)
    their_unet = diffusers.UNet2DConditionModel.from_pretrained(src / "unet")
    assert half.unet.conv_in.weight.dtype == torch.bfloat16
    assert torch.equal(half.unet.conv_in.weight, their_unet.conv_in.weight.to(torch.bfloat16))


SCHEDULERS = [
    ("PNDMScheduler", SD15_SCHEDULER),  # SD 1.x
    ("DDIMScheduler", dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)),
    ("EulerDiscreteScheduler", dict(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.015,
                                    num_train_timesteps=500, prediction_type="v_prediction")),
    ("DDPMScheduler", dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=1000)),
    ("DDIMScheduler", dict(trained_betas=torch.linspace(1e-4, 0.03, 300).tolist(), num_train_timesteps=300)),
]


@pytest.mark.parametrize("kind,settings", SCHEDULERS, ids=["pndm-sd15", "ddim-linear", "euler-v", "ddpm-cosine",
                                                           "trained-betas"])
def test_schedule_matches_diffusers_alphas_cumprod(kind, settings, tmp_path):
    getattr(diffusers, kind)(**settings).save_pretrained(tmp_path / "scheduler")
    schedule, prediction, betas = sd_folder.read_scheduler(tmp_path)
    theirs = getattr(diffusers, kind).from_pretrained(tmp_path / "scheduler")
    ref = theirs.alphas_cumprod.to(F64)  # diffusers keeps float32 tables
    assert schedule.num_timesteps == len(ref)
    assert torch.allclose(schedule.alphas_cumprod, ref, rtol=2e-5, atol=0)
    assert prediction == {"epsilon": "eps", "v_prediction": "v"}[settings.get("prediction_type", "epsilon")]
    # and out again: the exported DDIM config rebuilds the same table in diffusers
    exported = sd_folder.scheduler_config_to_diffusers(betas, prediction)
    ddim = diffusers.DDIMScheduler.from_config(exported)
    assert torch.allclose(ddim.alphas_cumprod.to(F64), ref, rtol=1e-6, atol=0)


def test_our_schedule_names_map_to_diffusers():
    for name in ("linear", "scaled_linear", "cosine"):
        cfg = sd_folder.scheduler_config_to_diffusers(name, "v")
        assert cfg["prediction_type"] == "v_prediction"
        ours = schedule_from_config(name).alphas_cumprod
        theirs = diffusers.DDIMScheduler.from_config(cfg).alphas_cumprod.to(F64)
        assert torch.allclose(ours, theirs, rtol=2e-5, atol=0), name
        assert torch.equal(schedule_from_config(cfg).alphas_cumprod, ours)


# ---------------------------------------------------------------- errors name the problem
def small_state(seed):
    cfg = SMALL_UNETS["sd1-layout"]
    theirs = diffusers_unet(cfg, torch.Generator().manual_seed(seed))
    return unet_config_from_diffusers(dict(theirs.config)), theirs.state_dict()


def test_key_and_shape_errors_name_the_key(seed):
    config, state = small_state(seed)
    extra = {**state, "down_blocks.0.attentions.0.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"1 key\(s\) with no home in our UNet: down_blocks\.0\.attentions\.0\.extra"):
        unet_from_diffusers(extra, config, source="unet/")
    gone = "up_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k.weight"
    with pytest.raises(ValueError, match="missing: " + re.escape(gone)):
        unet_from_diffusers({k: v for k, v in state.items() if k != gone}, config)
    bad = {**state, "mid_block.resnets.1.conv1.weight": torch.zeros(64, 64, 1, 1, dtype=F64)}
    with pytest.raises(ValueError, match=r"mid_block\.resnets\.1\.conv1\.weight has shape \(64, 64, 1, 1\), "
                                         r"our mid\.res2\.conv1\.weight needs \(64, 64, 3, 3\)"):
        unet_from_diffusers(bad, config)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    with pytest.raises(ValueError, match=re.escape(q) + r" has shape \(32, 31\).*one of 3 stacked"):
        unet_from_diffusers({**state, q: torch.zeros(32, 31, dtype=F64)}, config)
    ours = unet_from_diffusers(state, config)
    with pytest.raises(ValueError, match=r"missing: conv_in\.bias"):
        unet_to_diffusers({k: v for k, v in ours.items() if k != "conv_in.bias"}, config)
    with pytest.raises(ValueError, match=r"conv_out\.weight has shape \(4, 32, 1, 1\), the config gives"):
        unet_to_diffusers({**ours, "conv_out.weight": torch.zeros(4, 32, 1, 1)}, config)


@pytest.mark.parametrize("field,value,message", [
    ("act_fn", "gelu", r"act_fn=\"gelu\" is not supported"),
    ("up_block_types", ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"], r"up_block_types\[1\]=\"UpBlock2D\".*level 1"),
    ("down_block_types", ["CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "DownBlock2D"],
     r"down_block_types\[1\]=\"SimpleCrossAttnDownBlock2D\""),
    ("attention_head_dim", [2, 4, 4], r"attention_head_dim=\[2, 4, 4\].*one value for every block"),
    ("mid_block_type", "UNetMidBlock2D", r"mid_block_type=\"UNetMidBlock2D\""),
    ("class_embed_type", "timestep", r"class_embed_type=\"timestep\""),
    ("block_out_channels", [32, 48, 64], r"block_out_channels=\[32, 48, 64\].*multiple of the first"),
    ("norm_eps", 1e-6, r"norm_eps=1e-06"),
    ("attention_head_dim", 3, r"not divisible by num_heads=3"),
    ("a_future_field", 2, r"a_future_field=2.*does not know this field"),
])
def test_unet_config_errors_name_field_and_value(field, value, message):
    cfg = {**SMALL_UNETS["sd1-layout"], field: value}
    with pytest.raises(ValueError, match=message):
        unet_config_from_diffusers(cfg, "unet/config.json")
    assert unet_config_from_diffusers({**SMALL_UNETS["sd1-layout"], "a_future_field": None})  # null: left off


@pytest.mark.parametrize("field,value,message", [
    ("latents_mean", [0.1, 0.2, 0.3, 0.4], r"latents_mean=\[0\.1, 0\.2, 0\.3, 0\.4\]"),
    ("out_channels", 1, r"out_channels=1"),
    ("use_quant_conv", False, r"use_quant_conv=false"),
    ("up_block_types", ["UpDecoderBlock2D"], r"up_block_types=\[\"UpDecoderBlock2D\"\].*3 x UpDecoderBlock2D"),
])
def test_vae_config_errors_name_field_and_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        vae_config_from_diffusers({**SMALL_VAES["f4"], field: value}, "vae/config.json")


def test_export_refuses_what_diffusers_cannot_hold():
    with pytest.raises(ValueError, match=r"mid_attention=false is not supported"):
        unet_config_to_diffusers(UNET_CONFIGS["tiny"])  # the CPU demo: no mid attention
    with pytest.raises(ValueError, match=r"context_dim=null"):
        unet_config_to_diffusers(unet_config("sd15", context_dim=None))
    with pytest.raises(ValueError, match=r"ff_mult=2"):
        unet_config_to_diffusers(unet_config("sd15", ff_mult=2))
    with pytest.raises(ValueError, match=r"pooled_context=true"):
        unet_config_to_diffusers(unet_config("sd15", pooled_context=True))
    with pytest.raises(ValueError, match=r"attention_heads=2"):
        vae_config_to_diffusers(VAEConfig(attention_heads=2), 0.18)


@pytest.mark.parametrize("settings,message", [
    ({"beta_schedule": "sigmoid"}, r"beta_schedule=\"sigmoid\" is not supported"),
    ({"beta_schedule": "linear", "rescale_betas_zero_snr": True}, r"rescale_betas_zero_snr=true"),
    ({"beta_schedule": "linear", "prediction_type": "flow"}, r"prediction_type=\"flow\""),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, r"no beta_schedule.*FlowMatchEuler"),
])
def test_unsupported_schedulers_are_named(settings, message, tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=message):
        sd_folder.read_scheduler(tmp_path)


def test_missing_folders_and_files_are_named(tmp_path, seed):
    with pytest.raises(FileNotFoundError, match=r"diffusers folder not found: .*nowhere"):
        load_diffusers_pipeline(tmp_path / "nowhere")
    src = make_tiny_sd_folder(tmp_path / "sd", seed)
    (src / "scheduler" / "scheduler_config.json").rename(tmp_path / "scheduler_config.json")
    with pytest.raises(FileNotFoundError, match=r"scheduler config not found: .*scheduler_config\.json"):
        load_diffusers_pipeline(src)
    (tmp_path / "scheduler_config.json").rename(src / "scheduler" / "scheduler_config.json")
    weights = src / "vae" / "diffusion_pytorch_model.safetensors"
    weights.rename(src / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    (src / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model\.safetensors in .*vae.*only pickle "
                                                r"weights \(diffusion_pytorch_model\.bin\).*--variant"):
        load_diffusers_pipeline(src)
    (src / "unet" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"diffusers UNet config not found: .*unet/config\.json"):
        load_diffusers_pipeline(src)
    assert convert.main(["from-diffusers", str(src), "--out", str(tmp_path / "out")]) == 2
    assert convert.main(["to-diffusers", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2


def test_help_lists_both_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        convert.main(["--help"])
    assert exit_.value.code == 0
    assert "from-diffusers" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        convert.main(["to-diffusers", "--help"])
    assert exit_.value.code == 0 and "--sample-size" in capsys.readouterr().out


def test_sample_from_diffusers(tmp_path, seed):
    """``python -m ldm.sample --from-diffusers PATH`` on a tiny SD folder writes the folder's resolution
    (32 x 32) and a grid, the same image for the same seed, and another for another prompt."""
    import numpy as np
    from PIL import Image

    from ldm import sample

    src = make_tiny_sd_folder(tmp_path / "sd", seed)

    def draw(prompt, name):
        folder = tmp_path / name
        assert sample.main(["--from-diffusers", str(src), "--prompt", prompt, "--steps", "3", "--n", "1",
                            "--seed", "0", "--out", str(tmp_path / f"{name}.png"), "--images", str(folder)]) == 0
        assert (tmp_path / f"{name}.png").is_file()
        [path] = sorted(folder.glob("*.png"))
        with Image.open(path) as image:
            assert image.size == (32, 32)
            return np.asarray(image.convert("RGB"), dtype=np.int16)

    first, again, other = draw("a red cube", "a.png"), draw("a red cube", "b.png"), draw("a blue sphere", "c.png")
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 0

    # convert from-diffusers, then sample --unet on the written folder: the same image as from the SD folder
    assert convert.main(["from-diffusers", str(src), "--out", str(tmp_path / "ours")]) == 0
    folder = tmp_path / "ours_images"
    assert sample.main(["--unet", str(tmp_path / "ours"), "--prompt", "a red cube", "--steps", "3", "--n", "1",
                        "--seed", "0", "--out", str(tmp_path / "ours.png"), "--images", str(folder)]) == 0
    [path] = sorted(folder.glob("*.png"))
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image.convert("RGB"), dtype=np.int16), first)
