# make demo: set up and run the flagship job (SmolLM2-135M-Instruct becomes "ChatMASTER's assistant" on CPU)
# make test: set up and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunesmith-installed
DEMO_CFG ?= smollm2_135m_instruct_lora_persona

.PHONY: setup test demo clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned in the same command as peft/bitsandbytes so pip takes the CPU wheel, not a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0 bitsandbytes==0.50.2 -e ".[dev,qlora]"
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/tunesmith run $(DEMO_CFG)
	$(VENV)/bin/tunesmith chat work_dirs/smollm2_persona/merged --temperature 0 --max-new-tokens 60 \
		--prompt "Hey, could you tell me what your name is and who built you?"

clean:
	rm -rf work_dirs
