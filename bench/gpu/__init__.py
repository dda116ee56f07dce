"""GPU proof in one command: correctness, kernel speed, end to end and a training run, as one report.

    python -m bench.gpu --out DIR                      # on one CUDA GPU, 8 minutes at most
    python -m bench.gpu --out DIR --wheels wheels/     # diffusers (and its missing needs) from wheels
    python -m bench.gpu --dry-run --out /tmp/r         # the same code at toy sizes on the CPU (< 1 min)
    python -m bench.gpu --out DIR --sections correctness,speed --budget-s 240
    python -m bench.gpu --dry-run --out /tmp/r --inject-fault attention   # self-test: must fail

Writes ``DIR/gpu-report.md`` (failures first), ``DIR/gpu-report.json`` (every row) and
``DIR/gpu-report.png`` (speedups over each baseline); exits 1 when any check failed.

Sections, each with a share of the time budget (``--budget-s``, default 480 s, 60 in a dry run), cut short and said
so rather than overrun:

1. ``correctness``: the compiled Triton kernels (the interpreter in a dry run) against float64
   references, every variant the models reach: attention self / cross (77 keys), with and without
   key lengths, 16-byte aligned and unaligned rows, fp16 / bf16, head dims 40, 64, 80, 160 and 512
   (the sd VAE's; skipped with a note while ``kernels.attention`` refuses it), output and gradients;
   GroupNorm with and without SiLU and shift, NCHW and channels_last; a seeded fuzz of shapes.
2. ``speed``: attention at the SD 1.5 shapes against SDPA's backends, GroupNorm + SiLU against eager
   and ``torch.compile``; time, TFLOP/s, GB/s and % of the peaks measured at the start of the run.
3. ``e2e``: the ``sd15`` UNet (training step, 25-step sampling) and the ``sd`` VAE (encode, decode)
   against diffusers' models loaded with the same weights (``ldm.convert``).
4. ``training``: a 60-second training loop of the ``small`` UNet on latents of the built-in shapes.

Every timed row is checked first; a row that fails its check is marked FAILED and never timed.
The package: ``cli`` (flags, environment), ``common`` (device, budget, timing, rows, fault hook),
one module per section, ``output`` (markdown, JSON, PNG).
"""
