# Two commands do everything on a fresh machine (see README.md):
#   make demo   set up .venv/, then run the main job on the bundled default
#   make test   set up .venv/, then run the test suite
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.splitq-setup-stamp

.PHONY: demo test setup clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh scripts/torchvision_cpu_fix.py
	bash scripts/setup_env.sh
	touch $(STAMP)

# make demo MODEL=/path/to/Qwen2.5-VL-7B-Instruct [DATA=sharegpt4v.json IMAGE_DIR=images/] [SCHEME=w4a4]
DEMO_ARGS = $(if $(MODEL),--model $(abspath $(MODEL))) $(if $(DATA),--data $(abspath $(DATA))) \
            $(if $(IMAGE_DIR),--image-dir $(abspath $(IMAGE_DIR))) $(if $(SCHEME),--scheme $(SCHEME))
demo: $(STAMP)
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} $(PY) examples/demo.py $(DEMO_ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest

clean-venv:
	rm -rf $(VENV)
