"""The edgecli command line: one thin typer command per stage.

Each command loads the config, calls one stage function, renders its result. Heavy libraries
(torch, onnxruntime) are imported inside the stage functions, so ``edgecli --help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from edgecli import __version__
from edgecli.errors import EXIT_INTERRUPTED, NotImplementedStage, debug_enabled, report, report_unexpected

app = typer.Typer(
    name="edgecli",
    help="Train -> compress -> export -> bench -> infer: neural networks for edge devices, measured.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion: typer already imports click.shell_completion for --help
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

STAGE_MODULES = {
    "train": "edgecli.stages.train",
    "compress": "edgecli.stages.compress",
    "export": "edgecli.stages.export",
    "bench": "edgecli.stages.bench",
    "infer": "edgecli.stages.infer",
    "serve": "edgecli.stages.serve",
}

# Options shared by every stage command, defined once.
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="pipeline YAML file", show_default=False)]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config value: key.path=value (repeatable)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="rerun even if config and inputs are unchanged")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress or status lines on stderr")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="show library warnings and logs")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print the resolved config and exit")]


def _version(value: bool):
    if value:
        print(f"edgecli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")] = False,
):
    """edgecli: each subcommand reads one YAML config and passes ONNX artifacts to the next stage."""


def _setup(quiet: bool, verbose: bool) -> None:
    import logging
    import warnings

    from edgecli.report import set_quiet

    set_quiet(quiet)
    if verbose:
        os.environ["EDGECLI_VERBOSE"] = "1"
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    else:
        warnings.filterwarnings("ignore")  # library deprecation chatter stays off the terminal
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame):  # let cleanup (temp dirs, locks) run as for Ctrl-C
    from edgecli.errors import Terminated

    raise Terminated


_term_pending = False


def _defer_sigterm(signum, frame):  # while the one-line report is being written: finish it first
    global _term_pending
    _term_pending = True


def _exit_on_sigterm(signum, frame, code: int = 143):
    # the stage has ended and said what it had to; a SIGTERM now (torchrun stopping the peers of a failed
    # rank while this one shuts down) must not raise inside interpreter-exit finalizers and print their
    # traceback: leave at once with the conventional code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _stage_module(stage: str):
    name = STAGE_MODULES[stage]
    if importlib.util.find_spec(name) is None:
        raise NotImplementedStage(f"`edgecli {stage}` is not implemented yet")
    return importlib.import_module(name)


def _render(res, json_out: bool) -> None:
    from edgecli.report import fmt_bytes, info, print_json, render_table

    if json_out:
        print_json(res.to_json())
    else:
        for t in res.tables:
            render_table(t.title, t.columns, t.rows)
    for m in res.messages:
        info(m)
    if res.status == "done" and res.dir is not None:
        main_file = next((f for f in ("model.onnx", "results.json") if f in res.outputs), None)
        size = f", {fmt_bytes(res.outputs[main_file])}" if main_file else ""
        where = res.dir / main_file if main_file else res.dir
        info(f"{res.stage} done in {res.seconds:.1f} s{size}, {where}")
    if res.failure:
        print(f"check failed: {res.failure}", file=sys.stderr)


def _invoke(stage: str, config: Path, sets: list[str] | None, *, force=False, json_out=False, quiet=False,
            verbose=False, dry_run=False, **kwargs) -> None:
    _setup(quiet, verbose)
    try:
        from edgecli.config import dump_config, load_config

        cfg = load_config(config, sets or [])
        if dry_run:
            sys.stdout.write(dump_config(cfg))
            return
        mod = _stage_module(stage)
        from edgecli.artifacts import ArtifactStore

        store = ArtifactStore.for_config(cfg)
        res = mod.run(cfg, store, force=force, quiet=quiet, **kwargs)
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
            _render(res, json_out)
        code = res.exit_code
    except (Exception, KeyboardInterrupt) as e:  # report() knows which; unknown ones re-raise below
        signal.signal(signal.SIGTERM, _defer_sigterm)
        if debug_enabled() and not isinstance(e, KeyboardInterrupt):
            import traceback

            traceback.print_exc()
        code = report(e)
        if code < 0:
            code = report_unexpected(e)
    finally:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if _term_pending:
        _exit_on_sigterm(signal.SIGTERM, None, code or 143)
    if code:
        raise typer.Exit(code)


@app.command()
def train(
    config: ConfigOpt,
    set_: SetOpt = None,
    force: ForceOpt = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run from its last checkpoint")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    dry_run: DryRunOpt = False,
):
    """Train the configured model on its dataset; publish model.onnx, weights and metrics."""
    _invoke("train", config, set_, force=force, json_out=json_out, quiet=quiet, verbose=verbose, dry_run=dry_run,
            resume=resume)


@app.command()
def compress(
    config: ConfigOpt,
    set_: SetOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    dry_run: DryRunOpt = False,
):
    """Prune, distill and quantize a model, keeping only what holds the accuracy and speed goals."""
    _invoke("compress", config, set_, force=force, json_out=json_out, quiet=quiet, verbose=verbose, dry_run=dry_run)


@app.command()
def export(
    config: ConfigOpt,
    set_: SetOpt = None,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    dry_run: DryRunOpt = False,
):
    """Build the deployable bundle: optimised model.onnx, model.ort, card.json, parity checked."""
    _invoke("export", config, set_, force=force, json_out=json_out, quiet=quiet, verbose=verbose, dry_run=dry_run)


@app.command()
def bench(
    config: ConfigOpt,
    set_: SetOpt = None,
    force: ForceOpt = False,
    baseline: Annotated[Path | None, typer.Option("--baseline", help="an earlier results.json to compare with")] = None,
    profile: Annotated[bool, typer.Option("--profile", help="also profile each model with its runtime's own profiler "
                                          "(bench.profile): top operators by share of time, a file per model")] = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    dry_run: DryRunOpt = False,
):
    """Measure latency percentiles, throughput, memory, size and accuracy; enforce budgets.

    Always measures again (results are observations, never "up to date"); --force changes nothing.
    """
    sets = (set_ or []) + (["bench.profile=true"] if profile else [])
    _invoke("bench", config, sets, force=force, json_out=json_out, quiet=quiet, verbose=verbose, dry_run=dry_run,
            baseline=baseline)


@app.command()
def infer(
    inputs: Annotated[list[str], typer.Argument(help="image files, .npy arrays, .csv rows, text, or - for JSON lines on stdin")],
    config: ConfigOpt,
    set_: SetOpt = None,
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", min=1, help="labels per input (default infer.top_k)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON object per input and line on stdout")] = False,
    runtime: Annotated[str | None, typer.Option("--runtime", help="onnxruntime, litert, executorch or openvino "
                                                "(default infer.runtime, else by the file's suffix)")] = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    dry_run: DryRunOpt = False,
):
    """Run the exported model on raw inputs and print top-k labels with probabilities.

    JSON lines on stdin (-): {"pixels": [[...]]}, {"features": [...]}, {"text": "..."} or {"path": "x.png"},
    with an optional "id"; one result line per request, flushed at once. Exit 1 if any input failed.
    """
    # json_out=False for the summary: with --json each result is already its own JSON line
    sets = (set_ or []) + ([f"infer.runtime={runtime}"] if runtime else [])
    _invoke("infer", config, sets, json_out=False, quiet=quiet, verbose=verbose, dry_run=dry_run,
            inputs=inputs, json_out_stream=json_out, top_k_override=top_k)


@app.command()
def serve(
    config: ConfigOpt,
    set_: SetOpt = None,
    host: Annotated[str, typer.Option("--host", help="address to listen on; anything but loopback is reachable "
                                                     "from other hosts")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port (0: a free one, printed)")] = 8080,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    dry_run: DryRunOpt = False,
):
    """Serve the model over HTTP: POST /v1/predict (micro-batched), /healthz, /readyz, /v1/model, /metrics.

    Loads the model once; SIGTERM drains the requests in flight and exits 143, Ctrl-C exits 130.
    """
    _invoke("serve", config, set_, quiet=quiet, verbose=verbose, dry_run=dry_run, host=host, port=port)


@app.command()
def validate(
    config: ConfigOpt,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    no_build: Annotated[bool, typer.Option("--no-build", help="skip loading the data and building the model")] = False,
):
    """Check a config as the stages will: schema, names, data, and the model built and run on one sample."""
    _setup(False, False)
    try:
        from edgecli.config import load_config
        from edgecli.validate import check_artifacts, check_model, check_names, describe

        cfg = load_config(config, set_ or [])
        check_names(cfg)
        lines = describe(cfg) + check_artifacts(cfg) + ([] if no_build else check_model(cfg))
        if as_json:
            import json

            print(json.dumps({"config": str(config), "ok": True, "checks": lines}))
        else:
            for line in lines:
                print(line)
            print(f"{config}: ok")
    except (Exception, KeyboardInterrupt) as e:  # the same total funnel as the stage commands
        if debug_enabled() and not isinstance(e, KeyboardInterrupt):
            import traceback

            traceback.print_exc()
        code = report(e)
        if as_json and isinstance(e, Exception):
            import json

            from edgecli.errors import EdgeError

            msg = e.message if isinstance(e, EdgeError) else f"{type(e).__name__}: {e}"
            print(json.dumps({"config": str(config), "ok": False, "error": msg, "exit_code": code}))
        raise typer.Exit(code if code >= 0 else report_unexpected(e)) from None


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
