# Two commands do all the set-up on a fresh Linux machine with Python >= 3.10:
#   make demo   - install, train the VAE, train the text-conditioned UNet, sample a grid, score it
#   make test   - install, run the tests and a quick pass of the benchmark suite
#   make digits - install, train on the real handwritten digits (class-conditional), score the samples
# Both are idempotent: the install step is skipped while .venv is up to date with pyproject.toml.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUNS   ?= runs

.PHONY: install demo digits test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required, found " + sys.version.split()[0]'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: install
	$(PY) -m ldm.train_vae --out $(RUNS)/vae
	$(PY) -m ldm.train_unet --text --vae $(RUNS)/vae --out $(RUNS)/unet
	$(PY) -m ldm.sample --unet $(RUNS)/unet --vae $(RUNS)/vae --out $(RUNS)/samples/grid.png
	$(PY) -m ldm.eval_text --unet $(RUNS)/unet --vae $(RUNS)/vae --json $(RUNS)/samples/eval_text.json --sheet $(RUNS)/samples/splits.png
	@echo "pictures: $(RUNS)/samples/grid.png, $(RUNS)/samples/splits.png (validation grids and training GIF in $(RUNS)/unet/val/)"

digits: install
	$(PY) -m ldm.train_vae --data digits --resolution 16 --out $(RUNS)/digits-vae --threads 1
	$(PY) -m ldm.train_unet --data digits --class-cond --vae $(RUNS)/digits-vae --out $(RUNS)/digits-unet --val-cfg 1.5 --threads 1
	$(PY) -m ldm.eval_digits --unet $(RUNS)/digits-unet --threads 1 --json $(RUNS)/digits-unet/eval_digits.json --grid $(RUNS)/digits-unet/digits.png
	@echo "pictures: $(RUNS)/digits-unet/digits.png (validation grids and training GIF in $(RUNS)/digits-unet/val/)"

test: install
	$(PY) -m pytest tests -q -n 2
	$(PY) -m pytest bench --benchmark-only --bench-quick -q

bench: install
	$(PY) -m pytest bench --benchmark-only

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf $(RUNS) .pytest_cache .benchmarks
