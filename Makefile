# quant-abliterate — every target creates the virtualenv it needs by itself.
# `make pipeline` runs the main job on the embedded testbed; `make test` runs the tests.

PYTHON    ?= python3
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed

MODEL     ?= testbed/model
# The model's folder name, also when MODEL ends in '/' (as shell completion writes it):
# plain $(notdir testbed/model/) is empty and would name the output 'outputs/-nvfp4'.
MODEL_NAME = $(notdir $(patsubst %/,%,$(MODEL)))
# Empty: the CLI's own default output name, <model name>-<FORMAT> (e.g. model-NVFP4), so `make quantize`
# and `quant-abliterate quantize` write the same directory; set OUT=DIR to choose another.
OUT       ?=
MIX       ?= datasets_yaml/offline_mix.yaml
FORMAT    ?= nvfp4
TRIALS    ?= 200
PIPELINE  ?= pipelines/testbed_default.yaml
ABL_OUT   ?= outputs/$(MODEL_NAME)-abliterate
SELECT    ?=
ARGS      ?=

.PHONY: setup test pipeline quantize abliterate testbed testbed-hard testbed-judge testbed-data clean

# requirements.lock pins every transitive dependency so a fresh install
# resolves exactly as it did when the lock was written.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

pipeline: $(STAMP)
	$(PY) -m pipelines.cli run $(PIPELINE) $(ARGS)

quantize: $(STAMP)
	$(PY) -m pipelines.cli quantize --model $(MODEL) $(if $(OUT),--output $(OUT)) --mix $(MIX) --format $(FORMAT) $(ARGS)

abliterate: $(STAMP)
	$(PY) -m pipelines.cli abliterate --model $(MODEL) --n_trials $(TRIALS) --out $(ABL_OUT) \
	    $(if $(SELECT),--select "$(SELECT)") $(ARGS)

# Rebuild the committed testbed model bit for bit (about 10 minutes on 2 cores).
testbed: $(STAMP)
	$(PY) -m testbed.build --out testbed/model --overwrite

# Rebuild the committed hard testbed (issue 17: harm categories, look-alikes, a skill) bit for bit
# (600 steps on one thread: about 20 minutes training plus 10 minutes measuring on a shared 2-core CPU).
testbed-hard: $(STAMP)
	$(PY) -m testbed.build --world hard --out testbed/hard --overwrite

# Rebuild the committed testbed refusal judge (stage 2's --judge testbed/judge) bit for bit (~30 s on one core).
testbed-judge: $(STAMP)
	$(PY) -m testbed.judge --out testbed/judge --overwrite

# Regenerate the testbed's prompt sets and offline corpora under datasets_yaml/.
testbed-data: $(STAMP)
	$(PY) -m testbed.datasets --out datasets_yaml
	$(PY) -m testbed.datasets --world hard --out datasets_yaml

clean:
	rm -rf $(VENV) outputs .pytest_cache
