"""`sq-export run`: the whole pipeline into one folder, resumable and deterministic.

    from sq_export.run import RunOptions, run_pipeline
    manifest = run_pipeline("smollm2", "out/", RunOptions(recipe="paper"))

options.py says what a run is asked to do, stages.py what each stage does, context.py the models the stages share,
driver.py the manifest / hashing / staging machinery (any list of stages).
"""

from __future__ import annotations

from sq_export.run.options import STAGES, RunOptions

__all__ = ["RunOptions", "run_pipeline", "add_observer", "STAGES"]

OBSERVERS: list = []  # callables (stage name, event) every run tells; tools add theirs with add_observer


def add_observer(fn) -> None:
    """Have `fn(stage name, event)` told when each stage of every later run starts ("start") and ends ("ran",
    "skipped"; "failed" when it raises): profilers and tracers measure per stage without patching the driver."""
    OBSERVERS.append(fn)


def run_pipeline(model, out_dir, options: RunOptions | None = None, echo=None, observers=()) -> dict:
    """Run (or resume) the pipeline into `out_dir`; return the manifest (also in OUT/manifest.json). `observers`:
    callables (stage name, event) told when each stage starts ("start") and ends ("ran" / "skipped")."""
    from sq_export.run.context import RunContext
    from sq_export.run.driver import Driver
    from sq_export.run.stages import PIPELINE

    from sq_export.modeling import resolve_model_path

    options = options or RunOptions()
    options.validate()
    options.validate_model(str(model))  # --stream: a folder of safetensors (an alias is refused before resolving)
    resolve_model_path(str(model))  # a missing model is refused before OUT is created
    d = Driver(out_dir, PIPELINE, options, echo=echo, observers=[*OBSERVERS, *observers])
    d.ctx = RunContext(model, d.out, options, d.manifest, echo=d.echo)
    if options.stream_fallback_defaulted():
        d.echo(f"--stream: --fallback none (the {options.recipe} recipe's --fallback auto scores whole-model logits); "
               "pass --fallback N or NAMES to keep Linears in float")
    return d.run()
