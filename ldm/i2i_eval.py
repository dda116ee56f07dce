"""Scores of image-conditioned models on held-out scenes of the built-in shapes, one report per task.

Every task starts from the first ``n`` scenes of the held-out stream (``ShapesDataset(split="eval")``:
images the training never saw; their attribute combinations were, as in ``ldm.eval_text``) with their
captions as prompts, and reads the outputs back with the dataset's attribute reader:

- inpaint: the shape erased (its bounding box, grown by ``OBJECT_MARGIN``, masked) and drawn again from
  the caption: shape, colour and position read inside the mask; the kept pixels identical after
  compositing, and their PSNR in the model's raw output (no compositing);
- outpaint: one half masked (left, right, top, bottom in turn): the visible half kept (raw PSNR), the whole
  image read against the caption;
- colorize: the greyscale image in: colour (of the shape) and background read back;
- sr: the image at 1/``factor`` of the side in: PSNR and SSIM against the true render of the output made
  to agree with the input (``image2image.consistent``, sr's compositing) and of the raw output, beside
  bicubic and bicubic made to agree the same way, and the attributes read from them.

``repaint=True`` scores inpaint / outpaint with a plain text model through ``ldm.repaint`` (the baseline).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ldm import image2image as i2i
from ldm.data.shapes import ShapesDataset
from ldm.metrics import ATTRIBUTES, HEADLINE, psnr, score, ssim

DATA_SEED = 0  # the held-out scenes: ShapesDataset(split="eval", seed=DATA_SEED), the first n
OUTPAINT_SIDES = ("left", "right", "top", "bottom")
WRAP = 52  # characters of a caption line in the pictures


def held_out(n: int, resolution: int) -> tuple[torch.Tensor, list[dict], list[str]]:
    """The first ``n`` held-out scenes: images (n, 3, R, R) in [-1, 1], attributes, captions."""
    ds = ShapesDataset(resolution, length=max(n, 1), seed=DATA_SEED, split="eval")
    items = [ds[i] for i in range(n)]
    images = torch.stack([it["image"] for it in items])  # (n, 3, R, R)
    return images, [ds.attributes(i) for i in range(n)], [it["text"] for it in items]


def task_inputs(task: str, images: torch.Tensor, attrs: list[dict], factor: int):
    """The inputs of ``task`` for held-out images: (inputs, masks or None)."""
    R = images.shape[-1]
    if task == "inpaint":
        return images, torch.from_numpy(np.stack([i2i.object_mask(a, R) for a in attrs]))[:, None]
    if task == "outpaint":
        sides = [OUTPAINT_SIDES[i % len(OUTPAINT_SIDES)] for i in range(len(images))]
        return images, torch.from_numpy(np.stack([i2i.half_mask(None, R, s) for s in sides]))[:, None]
    if task == "sr":
        return i2i.downsample(images, factor), None
    return images, None


def _shares(shares: dict) -> dict:
    return {k: round(float(shares[k]), 4) for k in (*ATTRIBUTES, HEADLINE, "all")}


@torch.no_grad()
def evaluate_task(pipe, task: str, n: int = 200, *, factor: int = i2i.SR_FACTORS[-1], steps: int | None = None,
                  sampler: str | None = None, cfg: float | None = None, seed: int = 0, batch_size: int = 50,
                  noise_level: int = i2i.SAMPLE_AUG_LEVEL, repaint: bool = False,
                  repaint_resample: int | None = None) -> dict:
    """One report of ``task`` on ``n`` held-out scenes (see the module docstring); "images", "inputs" and
    "masks" hold the tensors for pictures."""
    i2i.check_task(task)
    if n <= 0:
        raise ValueError(f"evaluate_task: n must be positive, got {n}")
    R = pipe.resolution
    images, attrs, prompts = held_out(n, R)
    inputs, masks = task_inputs(task, images, attrs, factor)
    prompts = prompts if pipe.conditional else None
    t0 = time.perf_counter()
    if repaint:
        from ldm.repaint import DEFAULT_RESAMPLE
        from ldm.repaint import repaint as run_repaint

        if task not in i2i.MASKED_TASKS:
            raise ValueError(f"the RePaint baseline inpaints and outpaints; --task {task} needs a --task model")
        resample = repaint_resample or DEFAULT_RESAMPLE
        raw = run_repaint(pipe, inputs, masks, prompts, steps=steps or 50, cfg=cfg, seed=seed,
                          resample=resample, batch_size=batch_size, composite=False)
    else:
        raw = i2i.generate_task(pipe, task, inputs, masks, prompts, steps=steps, sampler=sampler, cfg=cfg,
                                seed=seed, noise_level=noise_level, batch_size=batch_size, composite=False)
    seconds = time.perf_counter() - t0
    out = i2i.composited(task, raw, inputs, masks)  # what generate_task returns with composite=True
    report = {"task": task, "n": n, "seed": seed, "seconds": round(seconds, 1),
              "method": "repaint" if repaint else "model"}
    if task in i2i.MASKED_TASKS:
        keep = 1 - masks  # (n, 1, R, R)
        kept = (out - images).abs().mul(keep).amax().item()
        # PSNR over the kept pixels only: the mean squared error there, per image
        mse = ((raw - images) / 2).pow(2).mul(keep).sum((1, 2, 3)) / (3 * keep.sum((1, 2, 3))).clamp_min(1)
        kept_psnr = (-10 * mse.clamp_min(1e-10).log10()).mean()
        report.update(kept_max_abs_diff=kept, kept_psnr_raw=round(float(kept_psnr), 2))
    if task == "sr":
        bicubic = i2i.upsample(inputs, R)
        b_shares, _ = score(bicubic, attrs)
        raw_shares, _ = score(raw, attrs)
        bicubic_agreed = i2i.consistent(bicubic, inputs)

        def db(x):
            return round(float(psnr(x, images).mean()), 2)

        def same(x):
            return round(float(ssim(x, images).mean()), 4)

        report.update(factor=factor, noise_level=noise_level, psnr=db(out), ssim=same(out), psnr_raw=db(raw),
                      ssim_raw=same(raw), read_raw=_shares(raw_shares),
                      input_gap=round(float((i2i.downsample(out, factor) - inputs).abs().amax()), 4),
                      bicubic_psnr=db(bicubic), bicubic_ssim=same(bicubic), bicubic_read=_shares(b_shares),
                      bicubic_consistent_psnr=db(bicubic_agreed), bicubic_consistent_ssim=same(bicubic_agreed))
    shares, seen = score(out, attrs)
    report["read"] = _shares(shares)
    report["misses"] = [{"prompt": p, "read": {a: s[a] for a in ATTRIBUTES}}
                        for p, s, want in zip(prompts or [""] * n, seen, attrs)
                        if any(s[a] != want[a] for a in ("shape", "colour", "position"))][:5]
    report.update(images=images, inputs=inputs, masks=masks, outputs=out, prompts=prompts)
    return report


def wrap(text: str, width: int = WRAP) -> str:
    """``text`` broken into lines of about ``width`` characters at spaces."""
    lines = [""]
    for w in text.split():
        if lines[-1] and len(lines[-1]) + len(w) >= width:
            lines.append("")
        lines[-1] = f"{lines[-1]} {w}".strip()
    return "\n".join(lines)


def strip(report: dict, rows: int = 6, scale: int = 3):
    """A labelled picture of a report: a row per example (input, what the model sees, output, and for sr the
    bicubic and the truth), the caption written beside it. -> PIL image."""
    from PIL import Image, ImageDraw

    from ldm.runlog import to_uint8_images

    task, R = report["task"], report["images"].shape[-1]
    rows = min(rows, report["n"])
    inputs, masks, images, out = (report["inputs"][:rows], None if report["masks"] is None else report["masks"][:rows],
                                  report["images"][:rows], report["outputs"][:rows])
    src, mask = i2i.source(task, inputs, masks, R)
    if task in i2i.MASKED_TASKS:  # the masked region shown in magenta: what the model must draw
        magenta = torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1)
        seen = mask * magenta + (1 - mask) * src
        cols = [("input", images), ("masked", seen), ("output", out)]
    elif task == "sr":
        low = torch.nn.functional.interpolate(inputs, size=(R, R), mode="nearest")
        cols = [(f"low-res 1/{report['factor']}", low), ("bicubic", src), ("output", out), ("truth", images)]
    else:
        cols = [("greyscale in", src), ("output", out), ("truth", images)]
    tile, pad, head, text_w = R * scale, 4, 14, 330
    W = len(cols) * (tile + pad) + pad + text_w
    canvas = Image.new("RGB", (W, head + rows * (tile + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    label = f"{task}" + (" (RePaint baseline)" if report["method"] == "repaint" else "")
    draw.text((len(cols) * (tile + pad) + pad, 1), label, fill="black")
    for c, (name, t) in enumerate(cols):
        draw.text((pad + c * (tile + pad), 1), name, fill="black")
        for r, a in enumerate(to_uint8_images(t)):
            img = Image.fromarray(a.numpy()).resize((tile, tile), Image.NEAREST)
            canvas.paste(img, (pad + c * (tile + pad), head + pad + r * (tile + pad)))
    for r, p in enumerate((report["prompts"] or [""] * rows)[:rows]):
        draw.text((len(cols) * (tile + pad) + pad, head + pad + r * (tile + pad) + 4), wrap(p), fill="black")
    return canvas


@torch.no_grad()
def evaluate_cascade(base, upscalers: list, n: int = 200, *, seed: int = 0, batch_size: int = 50,
                     noise_level: int = i2i.SAMPLE_AUG_LEVEL, steps: int | None = None,
                     cfg: float | None = None) -> dict:
    """The cascade on the first ``n`` held-out prompts (``eval_prompts``, as ``ldm.eval_text``): the base
    model's images and every upscaler's, each read back at its own resolution. -> {"stages": [{"resolution",
    "read"}...], "images": [stage tensors], "prompts"}."""
    from ldm.data.shapes import eval_prompts
    from ldm.metrics import PROMPT_SEED

    pairs = eval_prompts(n, PROMPT_SEED)
    prompts, attrs = [p for _, p in pairs], [a for a, _ in pairs]
    how = {k: v for k, v in (("steps", steps), ("cfg", cfg)) if v is not None}
    t0 = time.perf_counter()
    stages = i2i.generate_cascade(base, upscalers, prompts, seed=seed, noise_level=noise_level, batch_size=batch_size,
                                  base_kwargs={"steps": how.get("steps", base.defaults.steps),
                                               "cfg": how.get("cfg", base.defaults.cfg)}, up_kwargs=how)
    seconds = time.perf_counter() - t0
    reads = [{"resolution": s.shape[-1], "read": _shares(score(s, attrs)[0])} for s in stages]
    return {"task": "cascade", "n": n, "seed": seed, "noise_level": noise_level, "seconds": round(seconds, 1),
            "stages": reads, "images": stages, "prompts": prompts}


def cascade_strip(report: dict, rows: int = 6, scale_to: int = 96):
    """A labelled picture of a cascade: a column per stage (shown at one size), the prompt beside each row."""
    from PIL import Image, ImageDraw

    from ldm.runlog import to_uint8_images

    stages = report["images"]
    rows = min(rows, stages[0].shape[0])
    pad, head, text_w = 4, 14, 330
    canvas = Image.new("RGB", (len(stages) * (scale_to + pad) + pad + text_w, head + rows * (scale_to + pad) + pad),
                       "white")
    draw = ImageDraw.Draw(canvas)
    for c, s in enumerate(stages):
        draw.text((pad + c * (scale_to + pad), 1), f"{s.shape[-1]} px", fill="black")
        for r, a in enumerate(to_uint8_images(s[:rows])):
            img = Image.fromarray(a.numpy()).resize((scale_to, scale_to), Image.NEAREST)
            canvas.paste(img, (pad + c * (scale_to + pad), head + pad + r * (scale_to + pad)))
    x = len(stages) * (scale_to + pad) + pad
    draw.text((x, 1), "cascade", fill="black")
    for r, p in enumerate(report["prompts"][:rows]):
        draw.text((x, head + pad + r * (scale_to + pad) + 4), wrap(p), fill="black")
    return canvas
