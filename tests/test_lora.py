"""ldm.lora: LoRA on our UNet, merged exactly, written in the layout diffusers' load_lora_weights reads.

The reference is diffusers itself: a tiny random SD 1.x folder, its UNet in float64, the LoRA file
we write loaded with ``StableDiffusionPipeline.load_lora_weights`` (peft underneath); its UNet output
must equal our merged model's to float64 precision.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.lora import LORA_TARGETS, LoRA, LoRAConfig, load_lora, save_lora, target_names
from ldm.sd_folder import _assemble
from ldm.sd_format import unet_config_from_diffusers, unet_from_diffusers
from ldm.unet import UNet
from test_convert import (F64, TINY_SD_UNET, Float64Timesteps, make_tiny_sd_folder, redraw_, rel_err,
                          unet_inputs)

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers' LoRA loading runs on peft
TOL = 1e-10  # float64 both sides; measured ~1e-15


def ours_from(theirs) -> UNet:
    config = unet_config_from_diffusers(dict(theirs.config))
    state = {k: v.clone() for k, v in unet_from_diffusers(theirs.state_dict(), config).items()}
    return _assemble(UNet, config, state).to(F64)


def randomize_(lora: LoRA, g: torch.Generator) -> LoRA:
    """B starts at zero (no update); draw every factor so a wrong key or part would show."""
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return lora


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return make_tiny_sd_folder(tmp_path_factory.mktemp("sd") / "sd", seed=0)


@pytest.mark.parametrize("targets", LORA_TARGETS)
def test_lora_file_loads_in_diffusers_and_matches_merged(sd_folder, tmp_path, seed, targets):
    g = torch.Generator().manual_seed(seed)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    pipe.unet = redraw_(pipe.unet.to(F64).eval(), g)
    pipe.unet.time_proj = Float64Timesteps(TINY_SD_UNET["block_out_channels"][0])
    ours = ours_from(pipe.unet).eval()
    rank, alpha = 2 + seed % 3, 1.0 + seed % 7
    lora = randomize_(LoRA(ours, LoRAConfig(rank=rank, alpha=alpha, targets=targets)), g)
    assert all(p.dtype == F64 for p in lora.parameters())
    x, t, context = unet_inputs(TINY_SD_UNET, g)
    with torch.no_grad():
        base = ours(x, t, context)
        hooked = ours(x, t, context) if lora.attach() else None
        lora.detach_hooks()
    path = save_lora(tmp_path / "lora.safetensors", lora)

    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors", adapter_name="ours")
    weights_before = {k: v.clone() for k, v in ours.state_dict().items()}
    lora.merge()
    with torch.no_grad():
        ref = pipe.unet(x, t, encoder_hidden_states=context).sample
        merged = ours(x, t, context)
    assert rel_err(merged, ref) < TOL
    assert rel_err(hooked, ref) < TOL  # the hooks compute what the merged weights compute
    assert rel_err(base, ref) > 1e-3  # the LoRA changes the output
    lora.unmerge()
    after = ours.state_dict()
    assert all(torch.equal(after[k], weights_before[k]) for k in weights_before)  # unmerge is exact

    # the file reads back onto a fresh copy of the UNet, and diffusers' module list matches ours
    fresh = _assemble(UNet, ours.config, {k: v.clone() for k, v in weights_before.items()})
    again = load_lora(path, fresh)
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert header["unet.r"] == rank and header["unet.lora_alpha"] == rank  # the scale is folded into B
    assert again.names == target_names(ours, targets)
    again.merge()
    with torch.no_grad():
        assert rel_err(fresh(x, t, context), ref) < TOL


def test_targets_and_partial_files(tmp_path, seed):
    """attn adapts the attention projections only; a file covering some parts of a fused q/k/v (as
    many published LoRAs train only to_q and to_v) loads with zeros for the rest."""
    g = torch.Generator().manual_seed(seed)
    theirs = redraw_(diffusers.UNet2DConditionModel(**TINY_SD_UNET).to(F64).eval(), g)
    ours = ours_from(theirs)
    attn = target_names(ours, "attn")
    assert attn and all(n.rsplit(".", 1)[-1] in ("qkv", "q", "kv", "out") for n in attn)
    assert set(attn) < set(target_names(ours, "attn+ff")) < set(target_names(ours, "all"))
    lora = randomize_(LoRA(ours, LoRAConfig(rank=2, targets="attn")), g)
    path = save_lora(tmp_path / "l.safetensors", lora)
    state = {k: v for k, v in load_file(path).items() if ".attn1.to_k." not in k}
    save_file(state, tmp_path / "part.safetensors")
    part = load_lora(tmp_path / "part.safetensors", ours)
    for name, _, adapter in part.layers():
        full = dict(zip(lora.names, lora.adapters.values()))[name]
        if name.endswith("attn1.qkv"):
            assert torch.all(adapter.B[1] == 0) and torch.equal(adapter.B[0], full.B[0])
        else:
            assert torch.equal(adapter.delta(), full.delta())
    bad = dict(state)
    bad["unet.nowhere.lora_A.weight"], bad["unet.nowhere.lora_B.weight"] = torch.zeros(2, 2), torch.zeros(2, 2)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="nowhere"):
        load_lora(tmp_path / "bad.safetensors", ours)
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)


def test_reads_a_lora_that_diffusers_wrote(tmp_path, seed):
    """A LoRA trained the diffusers way (peft adapter on to_q and to_v only, alpha != rank), saved with
    save_lora_weights: load_lora reads its alpha from the header and our merged UNet gives diffusers' output."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    g = torch.Generator().manual_seed(seed)
    theirs = redraw_(diffusers.UNet2DConditionModel(**TINY_SD_UNET).to(F64).eval(), g)
    theirs.time_proj = Float64Timesteps(TINY_SD_UNET["block_out_channels"][0])
    ours = ours_from(theirs).eval()
    config = LoraConfig(r=2, lora_alpha=6, target_modules=["to_q", "to_v"], init_lora_weights=False)
    theirs.add_adapter(config)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(theirs), unet_lora_adapter_metadata=config.to_dict(),
        weight_name="theirs.safetensors")
    lora = load_lora(tmp_path / "theirs.safetensors", ours)
    assert {n.rsplit(".", 1)[-1] for n in lora.names} == {"qkv", "q", "kv"}  # to_q / to_v live in fused layers
    lora.merge()
    x, t, context = unet_inputs(TINY_SD_UNET, g)
    with torch.no_grad():
        ref = theirs(x, t, encoder_hidden_states=context).sample
        assert rel_err(ours(x, t, context), ref) < TOL
        lora.unmerge()
        assert rel_err(ours(x, t, context), ref) > 1e-3  # without it the output differs: the LoRA counts
