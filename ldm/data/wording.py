"""Captions the way people write them, and prompt splits that measure how far a model generalises.

Every attribute value of the built-in shapes has several words or phrases, in two fixed parts:
``TRAIN`` (what training captions may use) and ``EVAL`` (used only to build evaluation prompts).
Sentence frames, filler words and "noise" (style phrases, requests, second sentences) are split the
same way. ``varied_caption(attrs, rng)`` writes a training caption from the training part only: a
random phrase for each attribute, a random frame and attribute order, sometimes a filler adjective,
a style phrase, a request or a second sentence, sometimes the dataset's plain template caption.

``held_out(attrs)`` (``ldm.data.shapes``) is the documented rule that removes attribute combinations
from training: a scene whose (shape, colour, position) has ``(shape index + colour index + position
index) % 9 == 4`` (indices into ``SHAPES``, ``COLOURS``, ``POSITIONS``) is never rendered for the
training split (``ShapesDataset(holdout=True)``, the training split's default). That is 24 of the 216
triples (11%); every (shape, colour), (shape, position) and (colour, position) pair still occurs in
training with other values of the third attribute, so the held-out triples are new combinations of
known parts.

``split_prompts(name, n)`` gives ``n`` (attributes, prompt) pairs of one of ``EVAL_SPLITS``, all
drawn from the ``"eval"`` image stream:

- ``in-distribution``: the dataset's template captions of combinations seen in training (the
  captions may equal training captions word for word: this split measures in-distribution generation);
- ``held-out wording``: every attribute said with an eval-only phrase, in an eval-only frame;
- ``held-out combinations``: the held-out triples, in the template captions;
- ``noisy``: training-side attribute words with eval-only noise: filler adjectives, a style phrase,
  a request, a second sentence, another clause order, capitals and punctuation.
"""

from __future__ import annotations

import re

import numpy as np

from ldm.data.shapes import COLOURS, POSITIONS, SHAPES, ShapesDataset, caption, held_out

# (train phrases, eval-only phrases) per attribute value
COLOUR_WORDS = {
    "red": (("red", "crimson", "scarlet", "cherry red", "blood red"), ("ruby", "vermilion", "tomato coloured")),
    "orange": (("orange", "tangerine", "amber", "pumpkin"), ("apricot", "carrot coloured", "marigold")),
    "yellow": (("yellow", "lemon", "golden", "sunflower yellow"), ("mustard", "canary", "butter coloured")),
    "green": (("green", "emerald", "grass green", "leaf green"), ("lime", "jade", "kelly")),
    "blue": (("blue", "navy", "azure", "cobalt", "royal blue"), ("sapphire", "cerulean", "ultramarine")),
    "purple": (("purple", "violet", "plum", "grape", "deep purple"), ("lilac", "mauve", "amethyst")),
}
BACKGROUND_WORDS = {
    "black": (("black", "dark", "jet black", "pitch black"), ("charcoal", "ebony", "inky")),
    "white": (("white", "snow white", "pale", "bright white"), ("ivory", "milky", "chalk")),
    "gray": (("gray", "grey", "slate", "silver"), ("ash", "pewter", "smoky")),
    "blue": COLOUR_WORDS["blue"],
}
SHAPE_WORDS = {
    "circle": (("circle", "disc", "round dot", "ball", "round shape"), ("orb", "sphere", "circular blob")),
    "square": (("square", "box", "block", "square tile"), ("cube", "boxy patch", "four sided block")),
    "triangle": (("triangle", "pyramid", "wedge", "triangular shape"), ("three sided figure", "arrowhead", "delta")),
    "cross": (("cross", "plus sign", "plus", "cross shape"), ("plus symbol", "swiss cross", "addition sign")),
}
SIZE_WORDS = {
    "small": (("small", "little", "tiny", "smallish"), ("petite", "miniature", "wee")),
    "large": (("large", "big", "huge", "giant"), ("enormous", "massive", "oversized")),
}
POSITION_WORDS = {
    "top left": (("in the top left", "in the upper left corner", "at the top left corner", "in the top left area"),
                 ("high up on the left", "in the northwest corner", "at the very top left")),
    "top": (("at the top", "at the top edge", "in the upper middle", "at the top centre"),
            ("at the very top", "high up in the middle", "in the north")),
    "top right": (("in the top right", "in the upper right corner", "at the top right corner", "in the top right area"),
                  ("high up on the right", "in the northeast corner", "at the very top right")),
    "left": (("on the left", "at the left side", "on the left edge", "to the left"),
             ("at the far left", "in the west", "hugging the left side")),
    "center": (("in the center", "in the middle", "at the centre", "in the centre"),
               ("smack in the middle", "at the very center", "in the heart of the picture")),
    "right": (("on the right", "at the right side", "on the right edge", "to the right"),
              ("at the far right", "in the east", "hugging the right side")),
    "bottom left": (("in the bottom left", "in the lower left corner", "at the bottom left corner",
                     "in the bottom left area"),
                    ("low down on the left", "in the southwest corner", "at the very bottom left")),
    "bottom": (("at the bottom", "at the bottom edge", "in the lower middle", "at the bottom centre"),
               ("at the very bottom", "low down in the middle", "in the south")),
    "bottom right": (("in the bottom right", "in the lower right corner", "at the bottom right corner",
                      "in the bottom right area"),
                     ("low down on the right", "in the southeast corner", "at the very bottom right")),
}
# How the background is said; {bg} is its colour phrase.
BACKGROUND_FRAMES = (("on a {bg} background", "against a {bg} background", "on {bg}", "over a {bg} background",
                      "with a {bg} backdrop"),
                     ("set on a {bg} canvas", "upon a field of {bg}", "resting on {bg} paper"))
# Whole-caption frames: {obj} the sized, coloured shape, {where} its position, {bg} the background clause.
FRAMES = (("a {obj} {where} {bg}", "{where}, a {obj} {bg}", "there is a {obj} {where} {bg}",
           "a picture of a {obj} {where} {bg}", "an image with a {obj} {where} {bg}", "{obj}, {where}, {bg}",
           "a {obj} {bg}, {where}", "{bg}: a {obj} {where}"),
          ("somebody sketched a {obj} {where} {bg}", "my scene has one {obj}, {where}, {bg}",
           "imagine a {obj} {where} {bg}", "what we need is a {obj} placed {where} {bg}"))
# Words that change nothing the reader checks: fillers before the shape, style phrases, requests, second sentences.
FILLERS = (("simple", "plain", "clean", "neat", "solid"), ("cute", "shiny", "bold", "lovely", "glossy"))
STYLES = ((", clip art", ", vector graphic", ", simple illustration", ", flat design", ", icon"),
          (", in a flat cartoon style", ", watercolor painting", ", digital art, trending", ", high quality render",
           ", minimalist poster"))
REQUESTS = (("show ", "draw ", "render ", "make "), ("please make ", "can you paint ", "generate for me ",
                                                   "i want "))
SECOND_SENTENCES = ((" nothing else is there.", " the shape is clear.", " one object only."),
                    (" it should look nice!", " keep everything else empty.", " thanks a lot!!"))

TRAIN, EVAL = 0, 1  # which part of each (train, eval) pair
EVAL_SPLITS = ("in-distribution", "held-out wording", "held-out combinations", "noisy")
TEMPLATE_SHARE = 0.25  # share of varied training captions that stay the dataset's plain template caption
# chances of each optional extra in a varied training caption: every extra is a kind of word the model
# must learn to ignore, and people's prompts often carry several at once -- with these a quarter of the
# worded captions carry no style, request or second sentence and a third two or more (docs/wording/NOTES.md
# section 5: at a third of these rates, prompts with two or three extras lost shape and colour)
FILLER_P, STYLE_P, REQUEST_P, SECOND_P, SWAP_P, CAPS_P = 0.5, 0.4, 0.35, 0.35, 0.3, 0.1
# "varied-drop" captions leave one of size, colour, position or background unsaid this often, so that no
# attribute's drawing hangs on every other phrase being there
DROP_P = 0.15
DROPPABLE = ("size", "colour", "position", "background")


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def worded_caption(attrs: dict, rng: np.random.Generator, part: int, *, extras: bool, drop_p: float = 0.0) -> str:
    """A caption of ``attrs`` in the words of ``part`` (TRAIN or EVAL); ``extras``: maybe add fillers,
    a style phrase, a request, a second sentence and capitals from the same part; ``drop_p``: the chance
    that one of ``DROPPABLE`` goes unsaid."""
    colour = _pick(rng, COLOUR_WORDS[attrs["colour"]][part])
    size = _pick(rng, SIZE_WORDS[attrs["size"]][part])
    shape = _pick(rng, SHAPE_WORDS[attrs["shape"]][part])
    adjectives = [size, colour] if rng.random() >= SWAP_P else [colour, size]
    if extras and rng.random() < FILLER_P:
        adjectives.insert(int(rng.integers(len(adjectives) + 1)), _pick(rng, FILLERS[part]))
    where = _pick(rng, POSITION_WORDS[attrs["position"]][part])
    bg = _pick(rng, BACKGROUND_FRAMES[part]).format(bg=_pick(rng, BACKGROUND_WORDS[attrs["background"]][part]))
    dropped = _pick(rng, DROPPABLE) if drop_p and rng.random() < drop_p else None  # no draw when drop_p is 0
    if dropped in ("size", "colour"):
        adjectives.remove(size if dropped == "size" else colour)
    where, bg = ("" if dropped == "position" else where), ("" if dropped == "background" else bg)
    obj = " ".join(adjectives + [shape])
    text = _tidy(_articles(_pick(rng, FRAMES[part]).format(obj=obj, where=where, bg=bg)))
    if extras:
        text = _extras(text, rng, part, (STYLE_P, REQUEST_P, SECOND_P, CAPS_P))
    return text


def _tidy(text: str) -> str:
    """Spaces and punctuation left over where a phrase went unsaid."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,:])", r"\1", text)
    text = re.sub(r"([,:])(,)+", r"\1", text)
    return text.strip(" ,:")


def _articles(text: str) -> str:
    """'a' before a vowel becomes 'an', as a person would write it."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def _extras(text: str, rng: np.random.Generator, part: int, chances) -> str:
    style_p, request_p, second_p, caps_p = chances
    if rng.random() < style_p:
        text += _pick(rng, STYLES[part])
    if rng.random() < request_p:
        text = _pick(rng, REQUESTS[part]) + text
    if rng.random() < second_p:
        text = text.rstrip(".") + "." + _pick(rng, SECOND_SENTENCES[part])
    if rng.random() < caps_p:
        text = text.upper() if rng.random() < 0.5 else text[0].upper() + text[1:]
    return text


def varied_caption(attrs: dict, rng: np.random.Generator, drop: bool = False) -> str:
    """A training caption: training-side words only, seeded by ``rng``; ``TEMPLATE_SHARE`` of them the
    dataset's own template caption; ``drop``: ``DROP_P`` of the others leave one attribute unsaid."""
    if rng.random() < TEMPLATE_SHARE:
        return caption(attrs)
    return worded_caption(attrs, rng, TRAIN, extras=True, drop_p=DROP_P if drop else 0.0)


def noisy_caption(attrs: dict, rng: np.random.Generator) -> str:
    """An evaluation prompt with training-side attribute words and eval-only noise: a filler adjective,
    then at least two of a style phrase, a request, a second sentence; shuffled clauses; capitals; '!'."""
    colour = _pick(rng, COLOUR_WORDS[attrs["colour"]][TRAIN])
    size = _pick(rng, SIZE_WORDS[attrs["size"]][TRAIN])
    shape = _pick(rng, SHAPE_WORDS[attrs["shape"]][TRAIN])
    obj = f"{_pick(rng, FILLERS[EVAL])} {size} {colour} {shape}"
    where = _pick(rng, POSITION_WORDS[attrs["position"]][TRAIN])
    bg = _pick(rng, BACKGROUND_FRAMES[TRAIN]).format(bg=_pick(rng, BACKGROUND_WORDS[attrs["background"]][TRAIN]))
    clauses = [f"a {obj}", where, bg]
    order = rng.permutation(3)
    text = _articles(" ".join(clauses[i] for i in order) if order[0] == 0 else ", ".join(clauses[i] for i in order))
    kinds = rng.permutation(3)[: 2 + int(rng.integers(2))]  # two or three of style, request, second sentence
    chances = [1.0 if k in kinds else 0.0 for k in range(3)] + [0.5]
    text = _extras(text, rng, EVAL, chances)
    return text + _pick(rng, ("", "!", "...", " !!"))


def _eval_attributes(n: int, seed: int, want_held_out: bool) -> list[dict]:
    """The first ``n`` scenes of the ``"eval"`` stream whose combination is (or is not) held out."""
    ds = ShapesDataset(length=1 << 30, seed=seed, split="eval", holdout=False)
    out, i = [], 0
    while len(out) < n:
        a = ds.attributes(i)
        if held_out(a) == want_held_out:
            out.append(a)
        i += 1
    return out


def split_prompts(name: str, n: int, seed: int = 0) -> list[tuple[dict, str]]:
    """``n`` (attributes, prompt) pairs of the evaluation split ``name`` (one of ``EVAL_SPLITS``)."""
    if name not in EVAL_SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {EVAL_SPLITS}")
    if n <= 0:
        raise ValueError(f"split_prompts: n must be positive, got {n}")
    attrs = _eval_attributes(n, seed, want_held_out=name == "held-out combinations")
    rng = np.random.default_rng([seed, EVAL_SPLITS.index(name), 17])
    if name in ("in-distribution", "held-out combinations"):
        return [(a, caption(a)) for a in attrs]
    if name == "held-out wording":
        return [(a, worded_caption(a, rng, EVAL, extras=False)) for a in attrs]
    return [(a, noisy_caption(a, rng)) for a in attrs]


def words(text: str) -> set[str]:
    """The lower-case words of ``text``."""
    return set(re.findall(r"[a-z]+", text.lower()))


def _phrases(part: int) -> list[str]:
    tables = (COLOUR_WORDS, BACKGROUND_WORDS, SHAPE_WORDS, SIZE_WORDS, POSITION_WORDS)
    out = [p for table in tables for pair in table.values() for p in pair[part]]
    return out + [p for group in (BACKGROUND_FRAMES, FRAMES, FILLERS, STYLES, REQUESTS, SECOND_SENTENCES)
                  for p in group[part]]


def eval_only_words() -> set[str]:
    """Words of the evaluation part that no training phrase, frame or template uses."""
    from ldm.data.shapes import TEMPLATES, WHERE

    train = set().union(*(words(p) for p in _phrases(TRAIN)), *(words(t) for t in TEMPLATES),
                        *(words(w) for w in WHERE.values()), *(words(v) for v in POSITIONS + SHAPES),
                        *(words(c) for c in COLOURS), words("gray white black background"))
    return set().union(*(words(p) for p in _phrases(EVAL))) - train
