"""The small CLIP: its loss against the formula, save/load, a transformers CLIPModel in its place, the
held-out split, the scores, a seconds-long training run and the commands' errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SESSION_SEED
from t2i_helpers import make_text_encoder, make_vae

from ldm import eval_clip, train_clip
from ldm.clip import CLIP, CLIPConfig, HFCLIP, contrastive_loss, load_clip, projected, save_clip
from ldm.clip_training import (ClipTrainConfig, heldout_combo, heldout_scenes, recall, train_clip as train_loop,
                               training_scenes, zero_shot)
from ldm.data import caption
from ldm.errors import InputError
from ldm.text import TextEncoder

TINY = CLIPConfig(resolution=16, channels=(8, 16), norm_groups=4, embed_dim=12, text_width=16, text_hidden=24)
TINY_NOISY = CLIPConfig(in_channels=4, resolution=4, channels=(8, 16), stem_stride=1, norm_groups=4, embed_dim=12,
                        text_width=16, text_hidden=24, noise_aware=True, time_dim=16)


def direct_loss(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE written out term by term, in float64."""
    B = img.shape[0]
    total = img.new_zeros(())
    for i in range(B):
        sim_row = [scale * (img[i] * txt[j]).sum() for j in range(B)]  # image i against every text
        sim_col = [scale * (img[j] * txt[i]).sum() for j in range(B)]  # text i against every image
        total = total - (sim_row[i] - torch.log(sum(torch.exp(s) for s in sim_row)))
        total = total - (sim_col[i] - torch.log(sum(torch.exp(s) for s in sim_col)))
    return total / (2 * B)


@pytest.mark.parametrize("batch, dim", [(2, 3), (7, 5), (16, 12)])
def test_contrastive_loss_matches_the_formula_and_its_gradients(batch, dim):
    g = torch.Generator().manual_seed(SESSION_SEED + batch)
    img = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)
    scale = torch.tensor(1.0 + 20 * torch.rand((), generator=g).item(), dtype=torch.float64, requires_grad=True)
    ours, want = contrastive_loss(img, txt, scale), direct_loss(img, txt, scale)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours, (img, txt, scale))
    ref = torch.autograd.grad(direct_loss(img, txt, scale), (img, txt, scale))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda i, t, s: contrastive_loss(i, t, s), (img, txt, scale))


def test_matched_pairs_give_a_lower_loss_than_shuffled_ones():
    g = torch.Generator().manual_seed(SESSION_SEED)
    x = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    assert contrastive_loss(x, x, torch.tensor(10.0)) < contrastive_loss(x, x.roll(1, 0), torch.tensor(10.0))


@pytest.mark.parametrize("config", [TINY, TINY_NOISY], ids=["pixels", "noise-aware"])
def test_save_load_gives_the_same_embeddings(config, tmp_path):
    torch.manual_seed(SESSION_SEED)
    model = CLIP(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # move off the initialisation, so a load that kept it would show
            p.add_(0.1 * torch.randn_like(p))
    save_clip(tmp_path / "c", model, text_encoder=None)
    loaded = load_clip(tmp_path / "c", load_text_encoder=False)
    assert loaded.config == config
    x = torch.randn(3, config.in_channels, config.resolution, config.resolution)
    t = torch.rand(3) * 999 if config.noise_aware else None
    tok, lens = torch.randn(3, 5, config.text_width), torch.tensor([5, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_features(x, t), model.image_features(x, t), rtol=0, atol=0)
        torch.testing.assert_close(loaded.text_features(tok, lens), model.text_features(tok, lens), rtol=0, atol=0)
    torch.testing.assert_close(loaded.scale(), model.scale())
    # padding beyond a prompt's length changes nothing
    tok2 = tok.clone()
    tok2[1, 2:] = torch.randn(3, config.text_width)
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_features(tok2, lens)[1], loaded.text_features(tok, lens)[1])


def test_a_noise_aware_tower_reads_t_and_refuses_to_go_without_it():
    torch.manual_seed(SESSION_SEED)
    model = CLIP(TINY_NOISY).eval()
    x = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        a = model.image_features(x, torch.tensor([10.0, 10.0]))
        b = model.image_features(x, torch.tensor([900.0, 900.0]))
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="needs the timestep"):
        model.image_features(x)
    with pytest.raises(InputError, match=r"\(B, 4, 4, 4\)"):
        model.encode_image(torch.randn(2, 3, 4, 4), torch.zeros(2))


def test_load_refuses_a_mismatched_or_foreign_folder(tmp_path):
    torch.manual_seed(SESSION_SEED)
    save_clip(tmp_path / "c", CLIP(TINY))
    meta = json.loads((tmp_path / "c" / "clip.json").read_text())
    meta["config"]["embed_dim"] = 13
    (tmp_path / "c" / "clip.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="shape mismatch"):
        load_clip(tmp_path / "c", load_text_encoder=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither clip.json"):
        load_clip(tmp_path / "empty")
    with pytest.raises(InputError, match="not found"):
        load_clip(tmp_path / "nowhere")


def make_hf_clip(folder):
    """A tiny random transformers.CLIPModel with a character-level BPE tokenizer, saved offline."""
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {t: i for i, t in enumerate(letters + [c + "</w>" for c in letters]
                                        + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    torch.manual_seed(SESSION_SEED)
    config = HFConfig(text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32,
                                   "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32,
                                   "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"]},
                      vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
                      projection_dim=8)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    return model


def test_a_transformers_clip_folder_loads_in_its_place(tmp_path):
    model = make_hf_clip(tmp_path / "hf")
    clip = load_clip(tmp_path / "hf")
    assert isinstance(clip, HFCLIP) and not clip.noise_aware
    g = torch.Generator().manual_seed(SESSION_SEED)
    images = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    got = clip.encode_image(images)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = F.normalize(projected(model.get_image_features(pixel_values=((images + 1) / 2 - mean) / std)), dim=-1)
    torch.testing.assert_close(got, want)
    text = clip.encode_text(["a red circle", "blue"])
    assert text.shape == (2, 8)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(2))
    assert (text[0] - text[1]).abs().max() > 1e-4


def test_held_out_combinations_never_reach_training():
    train = training_scenes(600)
    held = heldout_scenes(300)
    assert not any(heldout_combo(a) for a in train) and all(heldout_combo(a) for a in held)
    key = lambda a: tuple(a[k] for k in ("shape", "colour", "size", "position", "background"))  # noqa: E731
    assert not {key(a) for a in train} & {key(a) for a in held}
    assert not {caption(a) for a in train} & {caption(a) for a in held}
    distinct = heldout_scenes(50, distinct=True)
    assert len({key(a) for a in distinct}) == len(distinct) == 50


def test_recall_counts_ranks():
    g = torch.Generator().manual_seed(SESSION_SEED)
    n = 9
    text = F.normalize(torch.randn(n, 6, generator=g), dim=-1)
    image = text.clone()
    image[[0, 1]] = image[[1, 0]]  # images 0 and 1 swapped: both miss at k=1, both hit at k=2
    r = recall(image, text, ks=(1, 2))
    sims = image @ text.T
    t2i = [(sims[:, j] > sims[j, j]).sum().item() for j in range(n)]  # the brute-force ranks
    assert r["t2i@1"] == pytest.approx(sum(k < 1 for k in t2i) / n)
    assert r["t2i@2"] == pytest.approx(sum(k < 2 for k in t2i) / n)
    assert r["i2t@1"] == pytest.approx((n - 2) / n)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return make_text_encoder(tmp_path_factory.mktemp("enc") / "encoder", SESSION_SEED % 1000)


@pytest.mark.parametrize("noisy", [False, True], ids=["pixels", "noise-aware"])
def test_a_short_run_learns_and_saves_a_loadable_clip(noisy, encoder_dir, tmp_path):
    encoder = TextEncoder(encoder_dir)
    vae = None
    if noisy:
        from ldm.pretrained import load_vae

        vae, _ = load_vae(make_vae(tmp_path / "vae", SESSION_SEED % 1000))
    config = ClipTrainConfig(out=str(tmp_path / "clip"), preset="latent" if noisy else "tiny", images=96, steps=100,
                             batch_size=32, lr=5e-4, warmup=2,
                             resolution=16, seed=SESSION_SEED % 1000, log_every=1)
    train_loop(config, encoder, vae=vae, vae_dir=str(tmp_path / "vae") if noisy else None, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    if not noisy:  # most noise levels of a noise-aware run hide the image: 100 steps teach it little
        assert last < 0.5 * first, (first, last)  # 24 seeds: last / first <= 0.073 at 100 steps, 0.37 at 60
    assert all(r["loss"] == r["loss"] for r in rows)
    clip = load_clip(tmp_path / "clip", text_encoder=encoder_dir)
    assert clip.noise_aware == noisy and clip.meta["training"]["steps"] == 100
    if not noisy:
        scenes = heldout_scenes(20)
        from ldm.clip_training import render_scenes

        z = zero_shot(clip, clip.encode_image(render_scenes(scenes, 16)).detach(), scenes)
        assert set(z) == {"shape", "colour", "size", "position", "background", "mean"}


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be positive"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--vae", "/nonexistent/vae"], "--vae"),
    (["--text-encoder", "/nonexistent/enc"], "--text-encoder"),
])
def test_train_clip_errors_are_one_line(argv, message, tmp_path, capsys):
    assert train_clip.main(argv + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_clip: error:") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_eval_clip_errors_are_one_line(tmp_path, capsys):
    torch.manual_seed(SESSION_SEED)
    save_clip(tmp_path / "c", CLIP(TINY))
    cases = [(["--clip", str(tmp_path / "none")], "CLIP folder not found"),
             (["--clip", str(tmp_path / "c"), "--n", "0"], "--n must be positive"),
             (["--clip", str(tmp_path / "c"), "--threads", "0"], "--threads must be positive")]
    for argv, message in cases:
        assert eval_clip.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("eval_clip: error:") and message in err[0], err


@pytest.mark.parametrize("sigma", [0.3, 2.0, 14.0])
def test_the_guidance_gradient_matches_finite_differences(sigma):
    """D' - D = s sigma^2 grad_x <f_img(x c_in, t), text>, the gradient checked by central differences in float64."""
    from ldm.clip_guidance import ClipGuidedDenoiser
    from ldm.diffusion import NoiseSchedule

    torch.manual_seed(SESSION_SEED)
    clip = CLIP(TINY_NOISY).double().eval()
    schedule = NoiseSchedule.from_name("linear")
    g = torch.Generator().manual_seed(SESSION_SEED + 1)
    x = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64) * (1 + sigma ** 2) ** 0.5
    text = F.normalize(torch.randn(2, TINY_NOISY.embed_dim, generator=g, dtype=torch.float64), dim=-1)
    scale = 3.0
    inner = lambda x, sigma: 0.5 * x  # noqa: E731  any denoiser: the guidance adds to whatever it says
    guided = ClipGuidedDenoiser(inner, clip, text, scale, schedule)
    sig = torch.full((2,), sigma, dtype=torch.float64)
    with torch.no_grad():
        added = guided(x, sig) - inner(x, sig)

    def similarity(x):  # the sum over the batch, each image against its own prompt
        c_in = (1 + sig ** 2).rsqrt().view(-1, 1, 1, 1)
        return (clip.image_features(x * c_in, schedule.sigma_to_t(sig)) * text).sum().item()

    eps = 1e-6
    fd = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=torch.float64)
        e[i] = eps
        e = e.view_as(x)
        with torch.no_grad():
            fd.view(-1)[i] = (similarity(x + e) - similarity(x - e)) / (2 * eps)
    torch.testing.assert_close(added, scale * sigma ** 2 * fd, rtol=1e-6, atol=1e-9 * sigma ** 2)
    assert fd.abs().max() > 1e-6  # a gradient that is there to compare


def tiny_pipeline(tmp_path, context_dim=None):
    from ldm.diffusion import NoiseSchedule
    from ldm.pipeline import Pipeline
    from ldm.pretrained import load_vae
    from ldm.unet import UNet, UNetConfig

    vae, _ = load_vae(make_vae(tmp_path / "vae", SESSION_SEED % 1000))
    torch.manual_seed(SESSION_SEED)
    unet = UNet(UNetConfig(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                           attention_levels=(), mid_attention=False, num_heads=2, context_dim=context_dim,
                           norm_groups=8)).eval()
    return Pipeline(unet=unet, vae=vae.eval(), schedule=NoiseSchedule.from_name("linear"), prediction="v",
                    latent_shape=(4, 4, 4))


def test_clip_guided_sampling_of_an_unconditional_unet(tmp_path):
    from ldm.clip_guidance import ClipGuide
    from ldm.pipeline import generate

    pipe = tiny_pipeline(tmp_path)
    torch.manual_seed(SESSION_SEED)
    clip = CLIP(TINY_NOISY).eval()
    text = F.normalize(torch.randn(2, TINY_NOISY.embed_dim), dim=-1)
    run = lambda s: generate(pipe, ["a", "b"], n=2, steps=4, sampler="euler", seed=3,  # noqa: E731
                             guide=ClipGuide(clip, text, s, pipe.schedule))
    plain = generate(pipe, None, n=4, steps=4, sampler="euler", seed=3)
    torch.testing.assert_close(run(0.0), plain)  # scale 0: the unguided images, the same noise
    guided = run(50.0)
    assert guided.shape == (4, 3, 16, 16) and (guided - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="takes no prompts"):
        generate(pipe, ["a"], n=1, steps=2, sampler="euler")


def test_clip_guide_refuses_a_pixel_clip_and_other_latents():
    from ldm.clip_guidance import clip_guide
    from ldm.diffusion import NoiseSchedule

    schedule = NoiseSchedule.from_name("linear")
    with pytest.raises(InputError, match="noise-aware"):
        clip_guide(CLIP(TINY), ["x"], 1.0, schedule, (3, 16, 16), "cpu")
    with pytest.raises(InputError, match=r"reads latents \(4, 4, 4\)"):
        clip_guide(CLIP(TINY_NOISY), ["x"], 1.0, schedule, (8, 8, 8), "cpu")


@pytest.mark.parametrize("argv, message", [
    (["--clip-guidance", "5"], "--clip-guidance needs --clip"),
    (["--clip", "x", "--clip-guidance", "-1"], "--clip-guidance must be >= 0"),
])
def test_sample_clip_flags_are_checked(argv, message, capsys):
    from ldm import sample

    assert sample.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_clip_score_is_the_cosine_of_image_and_prompt(encoder_dir):
    from ldm.clip import clip_score

    torch.manual_seed(SESSION_SEED)
    clip = CLIP(TINY).eval().attach_encoder(TextEncoder(encoder_dir))
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    prompts = ["a red circle", "a blue square on the left", "a small cross"]
    got = clip_score(clip, images, prompts)
    tokens, lengths = clip.encoder.encode(prompts)
    with torch.no_grad():
        img, txt = clip.image(images), clip.text(tokens, lengths)
    want = F.cosine_similarity(img.double(), txt.double(), dim=-1).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="noise-aware"):
        clip_score(CLIP(TINY_NOISY), torch.zeros(1, 4, 4, 4), ["x"])


def test_evaluate_prompts_scores_a_guided_unconditional_unet(tmp_path):
    from ldm.clip_guidance import ClipGuide
    from ldm.metrics import HEADLINE, evaluate_prompts

    pipe = tiny_pipeline(tmp_path)
    with pytest.raises(ValueError, match="unconditional"):
        evaluate_prompts(pipe, 3, steps=2)
    torch.manual_seed(SESSION_SEED)
    clip = CLIP(TINY_NOISY).eval()
    guide = ClipGuide(clip, F.normalize(torch.randn(3, TINY_NOISY.embed_dim), dim=-1), 5.0, pipe.schedule)
    r = evaluate_prompts(pipe, 3, sampler="euler", steps=2, guide=guide, return_images=True)
    assert r["images"].shape == (3, 3, 16, 16) and 0.0 <= r[HEADLINE] <= 1.0
