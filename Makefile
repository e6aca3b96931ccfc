# `make demo` and `make test` work on a fresh machine: both create (or reuse) the
# virtualenv and install what is missing first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Registry only: this machine's pip config offers a CPU-only torch wheel with which
# torchvision (hence timm and open_clip) cannot import.
PIP    := PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(VENV)/bin/pip
STAMP  := $(VENV)/.dtp_ds-installed
DATA   ?= data/synth
NPROC  ?= 2

.PHONY: venv demo demo-seqcomp demo-compress test test-fast lint bench clean-demo compare

venv: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $$(grep -E '^(torch|torchvision)==' requirements.txt)
	$(PIP) install -q --no-build-isolation -r requirements.txt
	$(PIP) install -q --no-build-isolation --no-deps -e .
	# DeepSpeed JIT-compiles its CPU shared-memory collective and, for an optimizer offload, its
	# CPU Adam on first use (a minute or more each); build them here rather than inside the first
	# training run or test, with the venv's ninja as every rank uses it (import dtp_ds puts it first:
	# dtp_ds.cluster.process_group.use_interpreter_ninja).
	$(PY) -c "import dtp_ds; from deepspeed.accelerator import get_accelerator as g; [b.load() for b in map(g().create_op_builder, ('ShareMemCommBuilder', 'CPUAdamBuilder')) if b]"
	touch $(STAMP)

$(DATA)/zeroshot/classnames.json: | $(STAMP)
	$(PY) tools/make_synthetic_shards --out $(DATA) --overwrite

# A tiny CLIP trained by 2 ranks under the deepspeed launcher (ZeRO-2, bf16), then
# zero-shot evaluated on the held-out synthetic split.
demo: $(STAMP) $(DATA)/zeroshot/classnames.json
	$(PY) -m dtp_ds.demo --data $(DATA) --nproc $(NPROC)

# Token reducers compared on one trunk: every arm trained on the synthetic shards with the tiny
# configs (same samples and batch; each of 3 seeds shared by every arm), then measured; means with
# 95% intervals, paired differences to plain (and evenly spaced DRIP against learned DRIP), which
# separate and which do not; table and compare.{json,csv,png} in logs/.
compare: $(STAMP) $(DATA)/zeroshot/classnames.json
	$(PY) tools/compare_reducers --data $(DATA) --nproc $(NPROC) --seeds 3 \
		--arms plain drip drip-uniform tokenlearner low-res --pairs drip-uniform:drip

# Seqcomp (sequence compression of the training input) with a CA-MSE schedule: a short pilot run of
# the tiny patch-stem trunk (checkpoints every 10 steps) -> tools/seqcomp_costs on this CPU ->
# tools/seqcomp_schedule (gradient bias, variance, cost-adjusted variance per stage) -> a run trained
# under the schedule it wrote; costs, schedule.{json,md,png} in logs/seqcomp/. A few minutes on 2 CPU cores.
demo-seqcomp: $(STAMP) $(DATA)/zeroshot/classnames.json
	$(PY) -m dtp_ds.seqcomp.demo --data $(DATA) --nproc $(NPROC)

# the old name, refused with the new one
demo-compress:
	@echo "make demo-compress was renamed make demo-seqcomp: use make demo-seqcomp" >&2; exit 2

# tools/ci_setup_ssh installs and starts sshd (127.0.0.1 only) + pdsh for tests/e2e; where it
# cannot (no apt, not root) it says why and the e2e tests skip with that reason.
test: $(STAMP)
	-$(PY) tools/ci_setup_ssh
	$(PY) -m pytest tests -q --durations=15

# The inner loop: the unit tier (no launcher, no multi-rank runs), without its few tests that run a
# whole tool in subprocesses (marked "run"; make test runs them).
test-fast: $(STAMP)
	$(PY) -m pytest tests/unit -q -m "not run" --durations=10

lint: $(STAMP)
	$(VENV)/bin/ruff check dtp_ds tests tools
