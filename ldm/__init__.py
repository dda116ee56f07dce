"""ldm: a compact latent diffusion system. The library entry point is ``ldm.Pipeline``:

    from ldm import Pipeline
    pipe = Pipeline.from_pretrained("runs/unet")
    images = pipe("a large red circle in the center on a black background", n=4)

Imported lazily, so ``import ldm.data`` (say) does not load the models.
"""

__all__ = ["Pipeline", "SampleConfig"]


def __getattr__(name: str):
    if name in __all__:
        import ldm.pipeline

        return getattr(ldm.pipeline, name)
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
