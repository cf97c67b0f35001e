"""The ``lorakit`` command line: validate, plan and run merge manifests; verify, inspect and scaffold.

Exit codes: 0 success, 1 invalid input (manifest or adapter), 2 I/O failure or an existing output,
130 interrupted (SIGINT or SIGTERM). Errors print one message (or one line per manifest problem)
without a traceback unless ``-v`` is given.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

# Set before torch loads OpenMP. lorakit's tensor operations are short and memory-bound. OpenMP
# threads that busy-wait between them (libgomp's default) take the core from the thread with work
# when the CPU is shared. On a loaded 2-core machine that made a float32 sum over a batch ten
# times slower. A passive wait costs microseconds per operation. A value the user set stays.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _exit_before_command(signum: int, frame: Any) -> None:
    """Exit with code 130 on SIGINT or SIGTERM that arrives before a command starts.

    Importing torch takes seconds, and a KeyboardInterrupt there prints the traceback of a
    half-finished import. Nothing has been written yet, so the process can leave at once.
    """
    os.write(2, b"error: interrupted; no output was written\n")
    os._exit(130)


# Only when this process is the lorakit program: Ctrl-C must still raise KeyboardInterrupt in a
# Python session that imports this module. Each command installs its own handlers while it runs.
if __name__ == "__main__" or Path(sys.argv[0] if sys.argv else "").stem == "lorakit":
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _exit_before_command)

import click  # noqa: E402
import yaml  # noqa: E402

import lorakit  # noqa: E402
from lorakit.errors import EXIT_INTERRUPTED, EXIT_INVALID_INPUT, EXIT_IO, LorakitError  # noqa: E402
from lorakit.execute import run_plan  # noqa: E402
from lorakit.inspection import format_summary, inspect_adapter  # noqa: E402
from lorakit.manifest import load_manifest  # noqa: E402
from lorakit.methods import method_names  # noqa: E402
from lorakit.plan import Plan, build_plan  # noqa: E402
from lorakit.resources import check_resources, format_bytes  # noqa: E402
from lorakit.scaffold import scaffold_manifest, write_scaffold  # noqa: E402
from lorakit.schema import load_schema  # noqa: E402
from lorakit.verify import verify_outputs  # noqa: E402

__all__ = ["main"]

logger = logging.getLogger("lorakit")

_EPILOG = """\b
Examples:
  lorakit validate manifests/*.yaml
  lorakit plan manifests/block64.yaml
  lorakit run manifests/block64.yaml --device cpu
  lorakit verify output/block64 --rerun
  lorakit inspect examples/adapters/seed100
  lorakit init adapters/seed* --method block --rank 64 -o manifests/block64.yaml
"""


# load_manifest reports a missing or unreadable manifest as an I/O error (exit 2), in the same
# "error: PATH: reason" form as every other error. Click's own check would print usage text.
_MANIFEST_PATH = click.Path(path_type=Path, readable=False)


def _configure_logging(verbosity: int) -> None:
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


def _fail(message: str, code: int) -> None:
    click.echo(message, err=True)
    sys.exit(code)


# Signals received while a command runs. A KeyboardInterrupt raised inside native code (such as
# safetensors building a tensor) can come back out as another exception, so _guarded checks this
# list, not only the exception type.
_signals_received: list[int] = []
_INTERRUPTED = "error: interrupted; no output was written"


def _interrupt(signum: int, frame: Any) -> None:
    """Record SIGINT or SIGTERM and unwind like Ctrl-C, so a temporary output folder is removed."""
    _signals_received.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def _guarded(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn lorakit's errors and interrupts into one message and an exit code; ``-v`` keeps the traceback."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = click.get_current_context().find_root().params.get("verbose", 0)
        _signals_received.clear()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            return function(*args, **kwargs)
        except KeyboardInterrupt:
            _fail(_INTERRUPTED, EXIT_INTERRUPTED)
        except Exception as error:
            if _signals_received:
                if verbose:
                    logger.exception("interrupted")
                _fail(_INTERRUPTED, EXIT_INTERRUPTED)
            if isinstance(error, LorakitError):
                if verbose:
                    logger.exception("failed")
                prefix = "error: " if "\n" not in str(error) else "error:\n"
                _fail(f"{prefix}{error}", error.exit_code)
            if isinstance(error, OSError):
                if verbose:
                    logger.exception("failed")
                name = f"{error.filename}: " if error.filename else ""
                _fail(f"error: {name}{error.strerror or error}", EXIT_IO)
            # torch reports a failed CPU allocation as RuntimeError and a CUDA one as OutOfMemoryError.
            if isinstance(error, MemoryError) or "can't allocate memory" in str(error) or type(error).__name__ == "OutOfMemoryError":
                if verbose:
                    logger.exception("failed")
                _fail(f"error: out of memory ({str(error).strip() or type(error).__name__}); lower the ranks in the manifest or free memory", EXIT_INVALID_INPUT)
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    wrapper.__name__ = function.__name__
    wrapper.__doc__ = function.__doc__
    return wrapper


@click.group(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(lorakit.__version__, prog_name="lorakit")
@click.option("-v", "--verbose", count=True, help="More logging: -v for progress details, -vv for debug; errors then show a traceback.")
def main(verbose: int) -> None:
    """Merge PEFT LoRA adapters from declarative YAML manifests."""
    _configure_logging(verbose)


def _print_plan(plan: Plan) -> None:
    manifest = plan.manifest
    click.echo(f"manifest  {manifest.path}")
    click.echo(f"sources   {', '.join(f'{a.name} ({len(a.modules)} modules, {a.weights_path.name})' for a in plan.adapters)}")
    click.echo(f"device    {plan.device}    output dtype {str(plan.output_dtype).removeprefix('torch.')}")
    for seed, path in plan.outputs:
        click.echo(f"output    {path}" + (f"  (seed {seed})" if seed is not None else ""))
    if plan.excluded:
        click.echo(f"excluded  {', '.join(plan.excluded)}")
    saved = plan.modules_to_save_record()
    if saved is not None:
        click.echo(f"copied    modules_to_save {', '.join(saved['modules'])} from {saved['source']} ({len(saved['tensors'])} tensors)")
    if plan.base_layers:
        click.echo(f"copied    base embedding weights {', '.join(key for key, _, _ in plan.base_layers)} (equal in every source)")
    click.echo("")
    header = ("projection", "method", "chosen by", "modules", "source ranks", "rank", "lora_A", "lora_B", "read")
    rows = []
    for group in plan.groups:
        a_shape, b_shape = group.output_shapes()
        method = ", ".join(f"{key}={value}" for key, value in group.spec.to_dict().items() if key != "method")
        rows.append(
            (
                group.projection,
                group.spec.method + (f" ({method})" if method else ""),
                group.spec.origin,
                str(len(group.module_paths)),
                "/".join(str(rank) for rank in group.source_ranks),
                str(group.output_rank),
                "x".join(map(str, a_shape)),
                "x".join(map(str, b_shape)),
                format_bytes(group.bytes_read),
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    click.echo("")
    device_memory = plan.device_memory_estimate()
    device_part = f", on {plan.device} {format_bytes(device_memory)}" if device_memory else ""
    click.echo(
        f"read {format_bytes(plan.bytes_read)}, write {format_bytes(plan.bytes_written)}, "
        f"estimated peak tensor memory {format_bytes(plan.peak_memory_estimate())}{device_part}"
    )


@main.command(epilog=_EPILOG)
@click.argument("manifests", nargs=-1, required=True, type=_MANIFEST_PATH)
@click.option("--no-sources", is_flag=True, help="Check the manifest alone, without opening the source adapters (for CI jobs without weights).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list with one object per manifest, in argument order.")
@_guarded
def validate(manifests: tuple[Path, ...], no_sources: bool, as_json: bool) -> None:
    """Check manifests against the schema and, unless --no-sources, against their adapters.

    Every problem is printed as FILE:LINE:COL: message. Exit 1 if any manifest is invalid.
    """
    worst = 0
    reports = []
    for path in manifests:
        try:
            manifest = load_manifest(path)
            if not no_sources:
                plan = build_plan(manifest, device="cpu")
                for adapter in plan.adapters:
                    adapter.close()
            reports.append({"manifest": str(path), "valid": True, "errors": []})
            if not as_json:
                click.echo(f"{path}: valid")
        except LorakitError as error:
            messages = getattr(error, "messages", None) or str(error).splitlines()
            worst = max(worst, error.exit_code)
            reports.append({"manifest": str(path), "valid": False, "errors": messages})
            if not as_json:
                for message in messages:
                    click.echo(message if message.startswith(str(path)) else f"{path}: {message}", err=True)
    if as_json:
        click.echo(json.dumps(reports, indent=2))
    if worst:
        sys.exit(worst)


@main.command(epilog=_EPILOG)
@click.argument("manifest_path", metavar="MANIFEST", type=_MANIFEST_PATH)
@click.option("--device", default="auto", show_default=True, help="Device to plan for: auto (CUDA when available), cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_guarded
def plan(manifest_path: Path, device: str, as_json: bool) -> None:
    """Show what `run` would do, without reading a tensor."""
    compiled = build_plan(load_manifest(manifest_path), device=device)
    for adapter in compiled.adapters:
        adapter.close()
    if as_json:
        click.echo(json.dumps(compiled.to_dict(), indent=2))
    else:
        _print_plan(compiled)


@main.command(epilog=_EPILOG)
@click.argument("manifest_path", metavar="MANIFEST", type=_MANIFEST_PATH)
@click.option("--device", default="auto", show_default=True, help="Device to merge on: auto (CUDA when available), cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("--no-resource-check", is_flag=True, help="Run even when the plan's estimated peak memory exceeds the available memory, or its output the free disk space.")
@_guarded
def run(manifest_path: Path, device: str, force: bool, no_progress: bool, no_resource_check: bool) -> None:
    """Merge the adapters a manifest names and write the output folder(s)."""
    compiled = build_plan(load_manifest(manifest_path), device=device)
    if not no_resource_check:
        check_resources(compiled)
    results = run_plan(compiled, force=force, progress=not no_progress)
    for result in results:
        click.echo(str(result.path))


@main.command(epilog=_EPILOG)
@click.argument("output", metavar="OUTPUT_DIR", type=click.Path(path_type=Path))
@click.option("--rerun", is_flag=True, help="Also merge again from the recorded manifest and sources (checked against their sha256 first) and compare the adapter files byte for byte.")
@click.option("--device", default=None, help="Device for --rerun. Default: the device recorded in provenance.json.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@_guarded
def verify(output: Path, rerun: bool, device: str | None, as_json: bool) -> None:
    """Check an output folder's files against the sha256 in its provenance.json.

    OUTPUT_DIR is an output folder, or the parent of the seed-<seed>/ folders of a multi-seed
    merge. Exit 1 naming each file that is missing or differs.
    """
    checks = verify_outputs(output, rerun=rerun, device=device)
    ok = all(check.ok for check in checks)
    if as_json:
        click.echo(json.dumps({"path": str(output), "ok": ok, "outputs": [check.to_dict() for check in checks]}, indent=2))
    else:
        for check in checks:
            for name in check.extra_files:
                click.echo(f"warning: {check.folder / name} is not in provenance.json, so verify does not check it", err=True)
            if check.ok:
                click.echo(check.summary())
            for problem in check.problems():
                click.echo(problem, err=True)
    if not ok:
        sys.exit(EXIT_INVALID_INPUT)


@main.command(name="inspect", epilog=_EPILOG)
@click.argument("adapter", metavar="ADAPTER_DIR", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_guarded
def inspect_command(adapter: Path, as_json: bool) -> None:
    """Summarise a PEFT LoRA adapter per projection: ranks, alphas, scales, dtypes, shapes, ΔW norms."""
    summary = inspect_adapter(adapter)
    click.echo(json.dumps(summary.to_dict(), indent=2) if as_json else format_summary(summary))


def _parse_param(context: click.Context, option: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    params = {}
    for value in values:
        key, separator, text = value.partition("=")
        if not separator or not key:
            raise click.BadParameter(f"{value!r} is not KEY=VALUE, for example density=0.3")
        params[key] = yaml.safe_load(text)
    return params


@main.command(epilog=_EPILOG)
@click.argument("adapters", metavar="ADAPTER_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--method", type=click.Choice(method_names()), required=True, help="Merge method of every module.")
@click.option("--rank", type=click.IntRange(min=1), help="Target rank K, for the methods that take one.")
@click.option("-p", "--param", "params", multiple=True, callback=_parse_param, metavar="KEY=VALUE", help="A method parameter, such as density=0.3; repeat for several.")
@click.option("--seed", "seeds", type=click.IntRange(min=0), multiple=True, help="A seed for methods that draw at random; repeat for several outputs. Default for such methods: 0.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Manifest file to write, such as manifests/block64.yaml. Default: print it.")
@click.option("--name", help="Merge name. Default: the manifest file name without .yaml.")
@click.option("--output-path", help="output.path, relative to the manifest. Default: ../output/NAME.")
@click.option("--schema-url", help="Schema for the yaml-language-server line. Default: manifest.schema.json beside the manifest, written there when missing.")
@click.option("--force", is_flag=True, help="Replace an existing manifest file.")
@_guarded
def init(
    adapters: tuple[Path, ...],
    method: str,
    rank: int | None,
    params: dict[str, Any],
    seeds: tuple[int, ...],
    output: Path | None,
    name: str | None,
    output_path: str | None,
    schema_url: str | None,
    force: bool,
) -> None:
    """Write a commented manifest that merges ADAPTER_DIR... with one method, validated before it is written."""
    scaffold = scaffold_manifest(
        list(adapters),
        method,
        rank=rank,
        params=params,
        seeds=list(seeds),
        output=output,
        name=name,
        output_path=output_path,
        schema_reference=schema_url,
    )
    if output is None:
        click.echo(scaffold.text, nl=False)
        return
    for path in write_scaffold(scaffold, force=force):
        click.echo(str(path))


@main.command(epilog=_EPILOG)
def schema() -> None:
    """Print the manifest JSON Schema, for editors (yaml-language-server) and other tools."""
    click.echo(json.dumps(load_schema(), indent=2))


if __name__ == "__main__":
    main()
