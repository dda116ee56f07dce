"""Does the frozen text encoder itself place held-out words near their meaning? A probe, no training.

A UNet trained on training-side words can only draw "a ruby circle" red if the encoder puts "ruby"
nearer to the training words for red than to those for the other colours. ``probe(encoder, layer)``
reads, for every attribute, each phrase's token states at one encoder layer inside a fixed sentence
(``CONTEXTS``: the other attributes fixed, the phrase's tokens averaged), takes the mean state of each
value's training phrases (``ldm.data.wording``, the TRAIN part) and reports the share of eval-only
phrases whose nearest mean (cosine) is their own value: a ceiling on what any conditioning built from
those states can carry over to the held-out wording. ``python -m ldm.encoder_probe`` prints it.
"""

from __future__ import annotations

import numpy as np
import torch

from ldm.data.shapes import ShapesDataset
from ldm.data.wording import (BACKGROUND_WORDS, COLOUR_WORDS, EVAL, EVAL_SPLITS, POSITION_WORDS, SHAPE_WORDS,
                              SIZE_WORDS, TRAIN, split_prompts, varied_caption)
from ldm.errors import InputError

TABLES = {"shape": SHAPE_WORDS, "colour": COLOUR_WORDS, "size": SIZE_WORDS, "position": POSITION_WORDS,
          "background": BACKGROUND_WORDS}
# the sentence each attribute's phrase is read in; {} is the phrase, the rest one fixed scene
CONTEXTS = {"shape": "a small red {} in the center on a white background",
            "colour": "a small {} circle in the center on a white background",
            "size": "a {} red circle in the center on a white background",
            "position": "a small red circle {} on a white background",
            "background": "a small red circle in the center on a {} background"}
DEFAULT_LAYERS = (2, 4, 6)


@torch.no_grad()
def phrase_states(encoder, attribute: str, phrases: list[str], layer: int) -> torch.Tensor:
    """Unit-length mean token state of each phrase inside ``CONTEXTS[attribute]``: (len(phrases), width)."""
    tok, model = encoder.tokenizer, encoder.model
    prefix = CONTEXTS[attribute].split("{}")[0]
    start = len(tok(prefix)["input_ids"]) - 1  # the prefix's tokens, less its closing [SEP]
    out = []
    for phrase in phrases:
        count = len(tok(phrase)["input_ids"]) - 2  # the phrase's own tokens, less [CLS] and [SEP]
        batch = tok(CONTEXTS[attribute].format(phrase), return_tensors="pt")
        states = model(**batch, output_hidden_states=True).hidden_states[layer][0]  # (L, width)
        out.append(states[start:start + count].mean(0))
    return torch.nn.functional.normalize(torch.stack(out).float(), dim=-1)


def probe(encoder, layer: int, tables: dict = TABLES) -> dict:
    """{attribute: {"accuracy": share of eval phrases nearest their own value's training mean,
    "wrong": [[phrase, the value it fell nearest], ...]}} at encoder ``layer`` (0: the embeddings)."""
    depth = len(encoder.model(**encoder.tokenizer("a", return_tensors="pt"), output_hidden_states=True).hidden_states)
    if not 0 <= layer < depth:
        raise InputError(f"--layer {layer}: the encoder has hidden states 0..{depth - 1}")
    result = {}
    for attribute, table in tables.items():
        values = list(table)
        train = [(v, p) for v in values for p in table[v][TRAIN]]
        held = [(v, p) for v in values for p in table[v][EVAL]]
        known = phrase_states(encoder, attribute, [p for _, p in train], layer)  # (T, width)
        means = torch.stack([known[[i for i, (v, _) in enumerate(train) if v == value]].mean(0)
                             for value in values])  # (V, width)
        queries = phrase_states(encoder, attribute, [p for _, p in held], layer)  # (E, width)
        nearest = (queries @ torch.nn.functional.normalize(means, dim=-1).T).argmax(1).tolist()  # (E,)
        wrong = [[p, values[j]] for (v, p), j in zip(held, nearest, strict=True) if values[j] != v]
        result[attribute] = {"accuracy": 1 - len(wrong) / len(held), "wrong": wrong}
    return result


# The readout probe: a learned reading of whole sentences, the way a UNet would read them
READOUT_TRAIN, READOUT_EVAL = 2000, 200  # training captions fitted; prompts scored per split
READOUT_L2 = 1e-3  # weight decay of the readout, per caption: keeps the separable training set's weights finite
READOUT_ITERS = 200


@torch.no_grad()
def sentence_states(encoder, texts: list[str], batch: int = 128) -> torch.Tensor:
    """Unit-length mean of the last layer's token states over each text's tokens: (len(texts), width),
    the sentence embedding all-MiniLM-L6-v2 was trained to give."""
    out = []
    for i in range(0, len(texts), batch):
        context, lengths = encoder.encode(texts[i:i + batch])  # (B, L, width), (B,)
        valid = (torch.arange(context.shape[1]) < lengths[:, None]).to(context.dtype)[..., None]  # (B, L, 1)
        out.append(torch.nn.functional.normalize((context * valid).sum(1) / valid.sum(1), dim=-1))
    return torch.cat(out).double()


def fit_readout(x: torch.Tensor, labels: torch.Tensor, classes: int, l2: float = READOUT_L2,
                iters: int = READOUT_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: (W (width, classes), b (classes,)) minimising the mean cross-entropy
    of ``x`` (N, width) against ``labels`` (N,) + ``l2`` |W|^2, by L-BFGS in float64."""
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, tolerance_grad=1e-10, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        value = torch.nn.functional.cross_entropy(x.double() @ w + b, labels) + l2 * w.pow(2).sum()
        value.backward()
        return value

    opt.step(loss)
    return w.detach(), b.detach()


def readout(encoder, n_train: int = READOUT_TRAIN, n_eval: int = READOUT_EVAL, seed: int = 0) -> dict:
    """{attribute: {split: share read right}}: a linear readout of each attribute from the sentence
    embedding, fitted on ``n_train`` varied training captions (``ldm.data.wording.varied_caption``, training
    words only, of training scenes) and scored on ``n_eval`` prompts of each ``EVAL_SPLITS`` split. A
    learned ceiling beside ``probe``'s nearest-mean one: what a reader trained on training words can
    carry to words it never saw."""
    data = ShapesDataset(length=n_train, seed=seed)
    rng = np.random.default_rng([seed, 23])
    scenes = [data.attributes(i) for i in range(n_train)]
    x = sentence_states(encoder, [varied_caption(a, rng) for a in scenes])  # (n_train, width)
    splits = {name: split_prompts(name, n_eval, seed) for name in EVAL_SPLITS}
    states = {name: sentence_states(encoder, [text for _, text in pairs]) for name, pairs in splits.items()}
    result = {}
    for attribute, table in TABLES.items():
        values = list(table)
        w, b = fit_readout(x, torch.tensor([values.index(a[attribute]) for a in scenes]), len(values))
        result[attribute] = {name: float(((states[name] @ w + b).argmax(1) == torch.tensor(
            [values.index(a[attribute]) for a, _ in pairs])).double().mean()) for name, pairs in splits.items()}
    return result
