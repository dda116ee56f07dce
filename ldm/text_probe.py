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

import torch

from ldm.data.wording import BACKGROUND_WORDS, COLOUR_WORDS, EVAL, POSITION_WORDS, SHAPE_WORDS, SIZE_WORDS, TRAIN
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
