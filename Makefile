# The README's commands. Each creates .venv if missing, installs what is needed, builds the
# extension (incrementally), then runs.
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# torch 2.14.1 (CUDA 13 build; runs without a GPU) lets CI compile the CUDA kernels with nvcc.
# For a small CPU-only setup: make TORCH_SPEC=torch==2.13.0 test
TORCH_SPEC ?= torch==2.14.1
STAMP := $(VENV)/.installed-$(subst =,_,$(subst <,_,$(subst >,_,$(TORCH_SPEC))))
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu') setup.py
BENCH_TIME := $(shell date +%Y%m%d-%H%M%S)

.PHONY: install build test demo bench bench-search info wheel clean gpu-check gpu-check-dry

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q "$(TORCH_SPEC)" numpy "setuptools>=64" ninja packaging
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[test,examples,hf,structured]"
	touch $(STAMP)

install: $(STAMP)

sparseops/.built: $(STAMP) $(SOURCES)
	$(PYTHON) setup.py -q build_ext --inplace
	touch $@

build: sparseops/.built

test: build
	$(PYTHON) -m pytest tests

demo: build
	$(PYTHON) -m sparseops demo

info: build
	$(PYTHON) -m sparseops info

# Kernel sweeps once per vector ISA this CPU runs (SPARSEOPS_CPU_ISA=avx2 on an AVX-512 machine stands
# in for AVX2-only machines), results named by CPU model and ISA: benchmarks/results/cpu-<model>-<isa>-*.
CPU_SLUG := $(shell (grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 || uname -m) | tr -cs 'A-Za-z0-9' '-' | sed 's/^-//; s/-$$//' | tr A-Z a-z)
BENCH_ISAS ?= $(shell $(PYTHON) -c "import sparseops, torch; print(' '.join(i for i in torch.ops.sparseops._cpu_isa_supported() if i != 'default'))" 2>/dev/null)
bench: build
	for isa in $(BENCH_ISAS); do \
		out=benchmarks/results/cpu-$(CPU_SLUG)-$$isa-$(BENCH_TIME).json; \
		SPARSEOPS_CPU_ISA=$$isa $(PYTHON) -m pytest benchmarks/bench_masked_linear.py benchmarks/bench_soft_mask.py \
			-o python_files="bench_*.py" --benchmark-only --benchmark-json=$$out -q && \
		$(PYTHON) benchmarks/report.py $$out && \
		SPARSEOPS_CPU_ISA=$$isa $(PYTHON) -m pytest benchmarks/bench_masked_conv2d.py -o python_files="bench_*.py" \
			--benchmark-only --benchmark-json=$(dir $$out)conv-$$(basename $$out) -q && \
		$(PYTHON) benchmarks/plot.py benchmarks/results/conv-$$(basename $$out) || exit 1; \
	done
	SPARSEOPS_CACHE_DIR=$$(mktemp -d) $(PYTHON) benchmarks/bench_isa.py --out benchmarks/results/isa-$(CPU_SLUG).md

# Whole searches (minutes): IMP on CIFAR VGG-16 and CS along its beta schedule, then the plots.
bench-search: build
	$(PYTHON) benchmarks/bench_search.py --out benchmarks/results/search-cpu.json
	$(PYTHON) benchmarks/plot.py benchmarks/results/search-cpu.json

# GPU bring-up in one call (docs/gpu_check.md): on a bare GPU machine with its own python3 and torch
# (no venv, nothing installed): build in place, info, GPU tests, benchmarks, tuner within BUDGET
# seconds; results in OUT (the device machine sets OUT). gpu-check-dry: the same pipeline here without
# a GPU (the venv's python; Triton under the interpreter, tiny shapes), as CI runs it.
OUT ?= /tmp/sparseops-gpu-check
BUDGET ?= 420
GPU_PYTHON ?= python3
gpu-check:
	PYTHON=$(GPU_PYTHON) bash scripts/gpu_check.sh --budget-s $(BUDGET) $(OUT)

gpu-check-dry: build
	PYTHON=$(PYTHON) bash scripts/gpu_check.sh --dry-run $(OUT)

# Release artefacts into dist/: sdist, CPU and CUDA wheels for TORCH_SPEC, each installed into a fresh
# venv and tested (SMOKE=0 skips that). Its own build venvs (.wheel-venvs/), not .venv. See README "Wheels".
SMOKE ?= 1
wheel:
	TORCH_SPEC="$(TORCH_SPEC)" SMOKE=$(SMOKE) scripts/build_wheels.sh

clean:
	rm -rf build sparseops/*.so sparseops/.built *.egg-info
