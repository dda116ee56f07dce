"""Fine-tuning a pretrained UNet: what ``train_unet --init-from PATH [--lora RANK]`` adds to the training loop.

- ``open_base(PATH, out)``: PATH is a Stable Diffusion 1.x folder in diffusers' layout (``unet/``,
  ``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``) or a folder of ours (``unet.json``, from
  ``train_unet`` or ``convert``). A diffusers folder is converted once into ``OUT/base`` (our files, the
  latent cache keys on its VAE file), then either kind gives the UNet's weights and config, the VAE,
  the text encoder with its tokenization (SD's CLIP: 77 tokens, padded with the end token as SD
  does, every position visible to cross-attention) and the training noise schedule and prediction.
- ``class_images(...)`` and ``PriorDataset``: DreamBooth's prior preservation (Ruiz et al. 2022,
  "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation"): before
  training, the pretrained model draws ``--class-images N`` pictures of ``--class-prompt`` ("a photo of
  a dog"); each batch is then half the user's pictures, half those, and the loss is
  instance + ``--prior-weight`` x class, so the model learns the new subject without forgetting what
  the class looks like.
- ``Trainable``: what the optimizer sees. A full fine-tune trains every weight; with LoRA
  (``ldm.lora``) only the adapters train, the UNet is frozen (no gradients, no optimizer state) and
  the EMA is the adapters' EMA; checkpoints then hold the adapters only.
- ``tune_decoder`` and ``round_trip``: a new kind of picture (``ldm.teach_shape``) must first survive the VAE;
  ``round_trip`` encodes and decodes to check, ``tune_decoder`` teaches the decoder alone (same latents).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ldm.checkpoint import load_json, save_json
from ldm.distributed import Dist
from ldm.errors import InputError
from ldm.lora import LORA_FILE, LoRA, LoRAConfig, save_lora
from ldm.pretrained import UNetFile, load_unet, save_unet
from ldm.sd_folder import convert_from_diffusers
from ldm.unet import UNet

BASE_DIR = "base"  # OUT/base: a diffusers folder converted to our files


@dataclass
class Base:
    """A pretrained model to start from."""

    folder: Path  # ours: unet.* (and vae.* unless info.vae names another folder)
    unet: UNet  # float32, eval, no gradients (the training copies its weights)
    info: UNetFile
    vae_dir: Path
    text_encoder: str | None  # a local folder; None: the packaged MiniLM
    text_options: dict  # ldm.text.TextEncoder's keyword arguments (pad_to_max, mask_padding, max_tokens)

    def carried(self, init_from: str, trainable: Trainable) -> dict:
        """What the fine-tuned unet.json records of its start (and diffusers' config, for ``convert to-diffusers``)."""
        out = {"init_from": str(Path(init_from).resolve())}
        if "diffusers_config" in self.info.extra:
            out["diffusers_config"] = self.info.extra["diffusers_config"]
        if trainable.lora is not None:
            out["lora"] = {"file": LORA_FILE, **asdict(trainable.lora.config)}
        return out


def is_diffusers_folder(path: Path) -> bool:
    return (path / "unet" / "config.json").is_file() and (path / "vae").is_dir()


def open_base(path: str | Path, out: str | Path, device="cpu", d: Dist | None = None) -> Base:
    """The model in ``path`` (see the module docstring); an InputError names what is missing. Under torchrun
    (``d``) rank 0 alone converts a diffusers folder while the others wait, then every rank reads it."""
    path, out = Path(path), Path(out)
    if is_diffusers_folder(path):
        folder = out / BASE_DIR
        source = str(path.resolve())

        def convert():
            done = (folder / "unet.json").is_file() and load_json(folder / "unet.json").get("source") == source
            if not done:  # converted once: the cache keys on the VAE file, which a new export would change
                try:
                    convert_from_diffusers(path, folder)
                except (FileNotFoundError, ValueError) as e:
                    raise InputError(f"--init-from {path}: {e}") from None

        (d or Dist()).on_main(convert)
    elif (path / "unet.json").is_file():
        folder = path
    else:
        raise InputError(f"--init-from {path}: neither a diffusers Stable Diffusion folder (unet/, vae/) nor a "
                         "folder of ours (unet.json)")
    unet, info = load_unet(folder, device)
    vae_dir = folder if (folder / "vae.json").is_file() else Path(info.vae or folder)
    if not (vae_dir / "vae.json").is_file():
        raise InputError(f"--init-from {path}: no VAE beside {folder / 'unet.json'} nor at {info.vae}")
    if info.text_encoder is None:
        raise InputError(f"--init-from {path}: the UNet is not text-conditional (no text encoder in its unet.json)")
    enc = info.text_encoder
    if enc.path is not None and not (Path(enc.path) / "config.json").is_file():
        raise InputError(f"--init-from {path}: the text encoder {enc.path} has no config.json")
    return Base(folder=folder, unet=unet, info=info, vae_dir=vae_dir, text_encoder=enc.path,
                text_options=enc.options())


CLASS_DIR = "class_images"  # OUT/class_images: the prior-preservation pictures and their metadata.jsonl
CLASS_BATCH = 16  # pictures per sampler run while drawing them


def class_images(base: Base, prompt: str, n: int, out: Path, device, seed: int, quiet: bool = True,
                 d: Dist | None = None) -> Path:
    """``n`` pictures of ``prompt`` drawn by the pretrained model (its own sampler, steps and guidance),
    written once into ``out/class_images`` as PNGs with a ``metadata.jsonl`` (reused when the prompt, count
    and seed match: the cache keys on the files). Under torchrun (``d``) rank 0 draws them, the others wait."""
    from ldm.pipeline import Pipeline
    from ldm.runlog import image_grid

    folder = out / CLASS_DIR
    record = {"prompt": prompt, "n": n, "seed": seed, "init_from": str(base.folder.resolve())}

    def draw():
        if (folder / "class_images.json").is_file() and load_json(folder / "class_images.json") == record:
            return
        pipe = Pipeline.from_pretrained(base.folder, device=device)
        images = pipe([prompt], n=n, seed=seed, batch_size=CLASS_BATCH, output="pt",
                      progress=not quiet)  # (n, 3, H, W)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for k in range(n):
            name = f"{k:05d}.png"
            image_grid(images[k:k + 1], pad=0).save(folder / name)
            rows.append(json.dumps({"file_name": name, "text": prompt}))
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
        save_json(record, folder / "class_images.json")  # last: a run killed before it draws them again

    (d or Dist()).on_main(draw)
    return folder


class PriorDataset:
    """The user's pictures (items 0..n_instance-1) followed by the class pictures."""

    def __init__(self, instance, prior):
        self.instance, self.prior, self.n_instance = instance, prior, len(instance)
        self.captions = list(instance.captions) + list(prior.captions)

    def __len__(self) -> int:
        return self.n_instance + len(self.prior)

    def __getitem__(self, i: int) -> dict:
        return self.instance[i] if i < self.n_instance else self.prior[i - self.n_instance]

    def describe(self) -> dict:
        return {"name": "folder+prior", "instance": self.instance.describe(), "prior": self.prior.describe()}


DECODER_BETAS = (0.9, 0.99)  # the VAE training's Adam betas (ldm.vae_training)


def tune_decoder(vae_dir: str | Path, dataset, out: str | Path, steps: int = 400, batch_size: int = 32,
                 lr: float = 1e-3, seed: int = 0, device="cpu") -> Path:
    """Teach a VAE's decoder new pictures, the encoder frozen: the latents (and a UNet's latent cache) stay
    the same, so a UNet fine-tuned on them can draw what the old decoder could not (a new shape). L2
    reconstruction of a fresh posterior sample, Adam with the VAE training's betas; the latent scale and
    shift are kept. Writes ``out/vae.*``."""
    from ldm.pretrained import load_vae, save_vae

    vae, meta = load_vae(vae_dir, device)
    vae.requires_grad_(False).train()
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr, betas=DECODER_BETAS)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(dataset), (batch_size,), generator=g).tolist()
        x = torch.stack([dataset[i]["image"] for i in idx]).to(device)  # (B, 3, H, W)
        with torch.no_grad():
            posterior = vae.encode(x)
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
        loss = torch.nn.functional.mse_loss(vae.decode(z), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    return save_vae(out, vae, created_by="ldm.finetune.tune_decoder", tuned_from=str(Path(vae_dir).resolve()),
                    decoder_steps=steps, final_loss=loss.item())


@torch.no_grad()
def round_trip(vae, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Encode (the posterior's mode) and decode: (N, 3, H, W) in [-1, 1] -> the same, clamped. What a UNet at
    best can draw through this VAE: a picture that does not survive it cannot be sampled either."""
    out = [vae.decode(vae.encode(images[i:i + batch_size]).mode()).clamp(-1, 1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


class Trainable:
    """The parameters a run trains, their EMA, and the checkpoint parts that hold them.

    ``lora`` None: every UNet weight trains (the EMA is a whole UNet). Else the UNet and its EMA copy
    are frozen and each carries adapters (``LoRA(...).attach()``): the optimizer and the EMA see the
    adapters only, and ``parts`` checkpoints them instead of the UNets."""

    def __init__(self, model: UNet, ema: UNet, lora: LoRAConfig | None):
        self.lora = self.ema_lora = None
        if lora is None:
            self.module, self.ema_module = model, ema
        else:
            model.requires_grad_(False)
            # the frozen base is the same for the model and its EMA: one copy in memory, not two
            ema.load_state_dict(model.state_dict(), assign=True)
            self.lora = LoRA(model, lora).to(next(model.parameters()).device).attach()
            self.ema_lora = LoRA(ema, lora).to(next(model.parameters()).device).attach().requires_grad_(False)
            self.ema_lora.load_state_dict(self.lora.state_dict())
            self.module, self.ema_module = self.lora, self.ema_lora
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.ema_params = list(self.ema_module.parameters())

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.module, "ema": self.ema_module}

    def describe(self) -> str:
        n = sum(p.numel() for p in self.params)
        if self.lora is None:
            return f"{n / 1e6:.2f}M parameters train"
        c = self.lora.config
        return (f"LoRA rank {c.rank}, alpha {c.alpha if c.alpha is not None else c.rank} on {len(self.lora.names)} "
                f"{c.targets} layers: {n / 1e6:.3f}M parameters train, the rest frozen")

    def export(self, out: Path, ema: UNet, info: UNetFile) -> None:
        """``out/unet.*`` (the EMA weights; with LoRA the EMA adapters merged in, so ``ldm.sample --unet out``
        samples the fine-tuned model as it is) and, with LoRA, ``out/lora.safetensors`` (diffusers' layout)."""
        if self.ema_lora is not None:
            save_lora(out / LORA_FILE, self.ema_lora)
            self.ema_lora.detach_hooks()
            self.ema_lora.merge()
        save_unet(out, ema, info)
