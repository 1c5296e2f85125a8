"""Command line: parse, call one function, print. No logic lives here."""
from __future__ import annotations

import functools
import json
import sys

import click

from numabench import __version__
from numabench.daemon.pools import SERVE_WARMUP
from numabench.errors import NumabenchError
from numabench.launcher.binding import ALLOCATORS, BINDERS
from numabench.launcher.options import (
    DEFAULT_ITERATIONS,
    DEFAULT_READY_TIMEOUT_S,
    DEFAULT_REQUEST_TIMEOUT_S,
    LOOPS_TARGET_NS,
    LOOPS_TARGET_SHARED_NS,
    MAX_REPEAT,
    MODES,
    TRANSPORTS,
    LaunchOptions,
    Workload,
)
from numabench.plans.launchplan import DEFAULT_BATCH
from numabench.plans.planner import CORE_KIND_CHOICES, LEFTOVER_POLICIES
from numabench.workers.backends import BACKENDS, ORT_OPT_LEVELS, PRECISIONS

INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report it


def user_errors(fn):
    """Print a NumabenchError as one clear message (no traceback) and exit non-zero; an
    interrupt that reaches here (a second Ctrl-C) exits 130, never click's `Aborted!`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NumabenchError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(INTERRUPTED_EXIT)

    return wrapper


class FiniteFloat(click.ParamType):
    """A finite number (no nan, no inf) at or above `minimum` (strictly above when `open_min`)."""

    name = "number"

    def __init__(self, minimum: float = 0.0, open_min: bool = True):
        self.minimum, self.open_min = minimum, open_min

    def convert(self, value, param, ctx):
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if number < self.minimum or (self.open_min and number == self.minimum):
            self.fail(f"{value} must be {'above' if self.open_min else 'at least'} {self.minimum:g}",
                      param, ctx)
        return number


POSITIVE = click.IntRange(min=1)
NOT_NEGATIVE = click.IntRange(min=0)


root_option = click.option(
    "--root", "root", default="/", show_default=True, type=click.Path(file_okay=False),
    help="Read the machine from this filesystem root (a captured sysfs tree) instead of the live system.")


# Shared by launch, serve and sweep: how workers are bound and which allocator they preload.
binder_option = click.option(
    "--binder", type=click.Choice(BINDERS), default=BINDERS[0], show_default=True,
    help="auto: numactl (CPUs and memory), else taskset, else the worker pins itself; none: no "
         "CPU or memory binding (the unpinned baseline; thread counts still set).")
# Shared by launch, serve and sweep: plan against a captured machine, run nothing.
dry_run_root_options = (
    click.option("--dry-run", is_flag=True, help="Plan and validate against the machine (or --root); run nothing."),
    click.option("--root", "root", default="/", show_default=True, type=click.Path(file_okay=False),
                 help="With --dry-run: plan against this captured sysfs tree (another machine's)."))
allocator_option = click.option(
    "--allocator", type=click.Choice(ALLOCATORS), default=ALLOCATORS[0],
    show_default=True, help="Preload an allocator library in every worker (recorded in the results).")
# Shared by launch, serve and sweep: run on a Ray cluster's hosts (docs/cluster.md).
ray_option = click.option(
    "--ray", "ray_address", metavar="ADDRESS",
    help="Run on a Ray cluster: auto (the running cluster), HOST:PORT, or local (one started for "
         "this run). Each host must advertise the numabench_host resource.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="numabench")
def cli():
    """Run pinned, NUMA-local instances of BERT-like models and measure them."""


# ---- topology -------------------------------------------------------------------------------
# (section owned by the topology part)


@cli.command()
@root_option
@click.option("--lscpu", "lscpu_file", type=click.Path(dir_okay=True), default=None,
              help="Cross-check against (and fill gaps from) saved "
                   "`LC_ALL=C lscpu -a -p=CPU,CORE,SOCKET,NODE,ONLINE` output.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the stable JSON document (docs/topology-json.md).")
@user_errors
def topology(root, lscpu_file, as_json):
    """Show packages, NUMA nodes, cores and the CPUs this process may use."""
    import json

    from numabench.fileio import read_text
    from numabench.topology import machine_to_dict, read_machine, render_machine

    lscpu_text = read_text(lscpu_file, "--lscpu file", allow_empty=False) if lscpu_file else None
    machine = read_machine(root, lscpu_text=lscpu_text, lscpu_source=lscpu_file)
    click.echo(json.dumps(machine_to_dict(machine), indent=2) if as_json else render_machine(machine))


# ---- plan -----------------------------------------------------------------------------------
# (section owned by the plans part)


def _list_option(value, what):
    """--nodes / --cpus: a kernel-style list ("0-3,8") or nothing."""
    from numabench.topology.cpulist import parse_cpulist

    if value is None:
        return None
    try:
        return parse_cpulist(value)
    except ValueError as e:
        raise NumabenchError(f"--{what.lower()}s {value[:80]!r} is not a {what} list like 0-3,8 "
                             f"({e})") from None


def planner_options(f):
    """The planner's restrictions and presets, shared by `plan` and `launch`."""
    for option in reversed((
        click.option("--nodes", help="Use only these NUMA nodes, e.g. 0 or 0,1."),
        click.option("--cpus", help="Use only these CPUs, e.g. 0-23,48-71."),
        click.option("--core-kind", type=click.Choice(CORE_KIND_CHOICES),
                     help="Hybrid CPUs: which cores (default: the fastest kind present; any = mix)."),
        click.option("--leftover", type=click.Choice(LEFTOVER_POLICIES),
                     help="Cores left over by equal groups: keep idle (default) or spread one by one "
                          "over the first groups of their node."),
        click.option("--preset", help="per-socket, per-node, latency, throughput, smart-dispatch, or a "
                                      "preset YAML file (docs/plans.md)."),
    )):
        f = option(f)
    return f


@cli.group("plan", invoke_without_command=True, subcommand_metavar="[show PLAN | validate PLAN]")
@click.option("--instances", "-n", type=POSITIVE, help="Number of instances (equal groups of cores).")
@click.option("--cores-per-instance", "-c", type=POSITIVE,
              help="Physical cores per instance (derives --instances; checked against it if both).")
@click.option("--batch", "-b", type=POSITIVE,
              help="Global batch, split evenly, larger shares first (default: 1 per instance).")
@click.option("--smt", is_flag=True, help="Give each instance its cores' SMT siblings too.")
@planner_options
@root_option
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Write the plan here instead of printing it.")
@click.pass_context
@user_errors
def plan_cmd(ctx, instances, cores_per_instance, batch, smt, nodes, cpus, core_kind, leftover,
             preset, root, output):
    """Plan core groups: print a YAML plan, or show / validate one.

    \b
    Examples:
      numabench plan --instances 4 --batch 8
      numabench plan --preset smart-dispatch --root /captured/tree -o plan.yaml
      numabench plan show plan.yaml
      numabench plan validate plan.yaml --root /captured/tree
    """
    import dataclasses

    from numabench.plans import PlanRequest, dump_plan, load_preset, make_plan
    from numabench.topology import read_machine

    ctx.obj = {"root": root}
    if ctx.invoked_subcommand is not None:
        return
    asked = {"instances": instances, "cores_per_instance": cores_per_instance, "batch": batch,
             "smt": smt or None, "nodes": _list_option(nodes, "node"),
             "cpus": _list_option(cpus, "CPU"), "core_kind": core_kind, "leftover": leftover}
    asked = {k: v for k, v in asked.items() if v is not None}
    if not asked and preset is None:
        click.echo(ctx.get_help())
        return
    from numabench.fileio import check_output_file, write_text_atomic

    if output:
        check_output_file(output, "-o")
    request = load_preset(preset) if preset else PlanRequest()
    plan = make_plan(read_machine(root), dataclasses.replace(request, **asked))
    text = dump_plan(plan)
    if output:
        write_text_atomic(output, text)
        click.echo(f"wrote {output}: {len(plan.instances)} instances, batch {plan.batch}", err=True)
    else:
        click.echo(text, nl=False)


def _plan_root(ctx, root):
    """--root may come after the subcommand or before it (`plan --root DIR show ...`)."""
    if ctx.get_parameter_source("root") == click.core.ParameterSource.DEFAULT and ctx.obj:
        return ctx.obj["root"]
    return root


@plan_cmd.command("show")
@click.argument("plan_file", metavar="PLAN", type=click.Path(dir_okay=False))
@root_option
@click.pass_context
@user_errors
def plan_show(ctx, plan_file, root):
    """Validate PLAN against the machine and print it as a table."""
    from pathlib import Path

    from numabench.plans import load_plan, render_plan, validate_plan
    from numabench.topology import read_machine

    machine = read_machine(_plan_root(ctx, root))
    plan = load_plan(Path(plan_file))
    validate_plan(plan, machine)
    click.echo(render_plan(plan, machine), nl=False)


@plan_cmd.command("validate")
@click.argument("plan_file", metavar="PLAN", type=click.Path(dir_okay=False))
@root_option
@click.pass_context
@user_errors
def plan_validate(ctx, plan_file, root):
    """Check PLAN against the machine (exit 0 when it can run here).

    Errors name the file, line and field: plan.yaml:12: instances[1].cpus: ...
    """
    from pathlib import Path

    from numabench.plans import load_plan, validate_plan
    from numabench.topology import read_machine

    machine = read_machine(_plan_root(ctx, root))
    plan = load_plan(Path(plan_file))
    validate_plan(plan, machine)
    click.echo(f"{plan_file}: ok ({len(plan.instances)} instances, {len(plan.cpus)} CPUs, "
               f"batch {plan.batch})")


# ---- launch ---------------------------------------------------------------------------------
# (section owned by the launcher part)

# Shared by launch and sweep: how the measuring loop feeds the workers.
inflight_option = click.option(
    "--inflight", type=click.IntRange(min=1), default=2, show_default=True,
    help="throughput mode: requests outstanding per instance (credits), so each worker finds its "
         "next input waiting and computes back to back; 1 = one round trip between requests.")



def _loops(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    if value.strip().lower() == "auto":
        return None
    from numabench.workers.protocol import MAX_LOOPS  # numpy: only when a count is given
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_LOOPS:
        raise click.BadParameter(f"auto or a whole number from 1 to {MAX_LOOPS}, not {value!r}")
    return n


loops_option = click.option(
    "--loops", default="auto", show_default=True, callback=_loops,
    help="throughput mode: forward passes per request, back to back and each timed, so "
         "numabench's own cost per message is paid once per request; auto: calibrated per "
         f"instance to about {LOOPS_TARGET_NS // 1_000_000} ms of compute per request "
         f"({LOOPS_TARGET_SHARED_NS // 1_000_000} ms when every CPU runs a worker, so the coordinator "
         "wakes on workers' CPUs less often); 1: one pass per message.")

start_option = click.option(
    "--start", type=click.Choice(["fork", "exec"]), default="fork", show_default=True,
    help="fork: workers are forked from one process per NUMA node that has imported the framework "
         "once (its pages shared; each worker then starts in a fraction of a second); exec: each "
         "worker is a fresh interpreter that imports it (README, 'Starting workers').")


def threading_options(f):
    """Shared by launch and sweep: the OpenMP runtime and thread binding inside each instance."""
    f = start_option(f)
    f = click.option("--pin-threads/--no-pin-threads", default=True, show_default=True,
                     help="Bind each OpenMP (or ONNX Runtime) thread to its own CPU of the instance "
                          "(OMP_PROC_BIND/OMP_PLACES, KMP_AFFINITY); variables you set are kept.")(f)
    return click.option("--omp-runtime", type=click.Choice(["gnu", "intel"]), default="gnu",
                        show_default=True,
                        help="gnu: the framework's own OpenMP (libgomp for PyTorch wheels); intel: "
                             "preload libiomp5.so (pip install intel-openmp) as torch's run_cpu does.")(f)


# Shared by launch and serve: one read-only weights copy per NUMA node (docs/backends.md).
share_weights_option = click.option(
    "--share-weights/--no-share-weights", default=Workload.share_weights, show_default=True,
    help="pytorch: workers map one read-only copy of the weights per NUMA node instead of each "
         "holding its own (docs/backends.md).")
weights_dir_option = click.option(
    "--weights-dir", type=click.Path(file_okay=False),
    help="Folder for the per-node weights copies (default /dev/shm/numabench-UID/weights; "
         "not on tmpfs: one copy in the page cache).")


def build_workload(*, backend: str, compute_us: float | None = None, cache_dir: str | None = None,
                   ort_opt_level: str | None = None, **fields) -> Workload:
    """The Workload of `launch` and `serve` alike: the backend options from their shared
    command-line options, the other fields as given."""
    from pathlib import Path

    options = {"compute_ns": round(compute_us * 1000)} if compute_us is not None else {}
    if (cache_dir or ort_opt_level) and backend != "onnxruntime":
        raise NumabenchError("--cache-dir and --ort-opt-level apply to --backend onnxruntime only")
    if cache_dir:
        options["cache_dir"] = str(Path(cache_dir).resolve())
    if ort_opt_level:
        options["opt_level"] = ort_opt_level
    return Workload(backend=backend, backend_options=options, **fields)


@cli.command("launch")
@click.option("--instances", "-n", type=POSITIVE, help="Number of instances (default: 1, or the plan's).")
@click.option("--cores-per-instance", "-c", type=POSITIVE,
              help="Physical cores per instance (derives --instances).")
@click.option("--batch", "-b", type=POSITIVE,
              help="Global batch, split over the instances (default: the plan's, else "
                   f"{DEFAULT_BATCH} rounded up to a multiple of the instance count).")
@click.option("--seq", "-s", type=POSITIVE, default=Workload.seq, show_default=True,
              help="Sequence length in tokens.")
@click.option("--model", "-m", default=Workload.model, show_default=True,
              help="Built-in config (random weights), minilm, a local folder or a hub id.")
@click.option("--backend", type=click.Choice(sorted(BACKENDS)), default=Workload.backend,
              show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=Workload.precision,
              show_default=True)
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False),
              help="Use this YAML plan instead of planning.")
@click.option("--smt", is_flag=True, help="Give each instance its cores' SMT siblings too.")
@planner_options
@click.option("--iterations", "-i", type=POSITIVE,
              help=f"Steps (split) or requests per instance (throughput); default {DEFAULT_ITERATIONS}.")
@click.option("--duration", "-d", type=FiniteFloat(), help="Measure for this many seconds instead of --iterations.")
@click.option("--warmup", "-w", type=NOT_NEGATIVE, default=Workload.warmup, show_default=True,
              help="Warm-up runs per instance on the exact shapes.")
@click.option("--mode", type=click.Choice(MODES), default=Workload.mode, show_default=True,
              help="split: each step splits the batch over all instances; "
              "throughput: each instance runs its own shards back to back.")
@click.option("--text", "text_file", type=click.Path(dir_okay=False),
              help="Real text, one sample per line (needs a tokenizer).")
@click.option("--seed", type=NOT_NEGATIVE, default=Workload.seed, show_default=True,
              help="Seed for the random token ids.")
@click.option("--compute-us", type=FiniteFloat(open_min=False),
              help="noop backend: fixed compute time per request, in microseconds.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="onnxruntime: folder of exported ONNX files (default $XDG_CACHE_HOME/numabench/onnx "
                   "or ~/.cache/numabench/onnx).")
@click.option("--ort-opt-level", type=click.Choice(ORT_OPT_LEVELS),
              help="onnxruntime: graph optimization level (default all).")
@share_weights_option
@click.option("--keep-weights", is_flag=True,
              help="Keep the per-node weights copies on tmpfs for the next run (default: removed).")
@weights_dir_option
@binder_option
@allocator_option
@inflight_option
@loops_option
@threading_options
@click.option("--transport", type=click.Choice(TRANSPORTS), default=LaunchOptions.transport,
              show_default=True)
@click.option("--ready-timeout", type=FiniteFloat(), default=DEFAULT_READY_TIMEOUT_S, show_default=True,
              help="Seconds every instance may take to load and warm up.")
@click.option("--request-timeout", type=FiniteFloat(), default=DEFAULT_REQUEST_TIMEOUT_S,
              show_default=True, help="Seconds to wait for any reply while measuring (a hung worker).")
@click.option("--repeat", type=click.IntRange(1, MAX_REPEAT), default=1, show_default=True,
              help="Run K times, fresh workers each; results in RUN_DIR/rep-<k>/results.json.")
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Folder for logs and results (default runs/<time>-<pid>); must not hold results.")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Also write the results JSON here (its folder must exist).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
@ray_option
@click.option("--hosts", type=int, help="With --ray: launch on this many hosts at once (default: all).")
@dry_run_root_options[0]
@dry_run_root_options[1]
@user_errors
def launch_cmd(instances, cores_per_instance, batch, seq, model, backend, precision, plan_file, smt,
               nodes, cpus, core_kind, leftover, preset, iterations, duration, warmup, mode, text_file,
               seed, compute_us, binder, allocator, transport, ready_timeout, request_timeout, repeat,
               run_dir, output, as_json, cache_dir, ort_opt_level, share_weights, keep_weights,
               weights_dir, ray_address, hosts, inflight, loops, omp_runtime, pin_threads, start, dry_run,
               root):
    """Run pinned instances of a model and report latency and throughput.

    \b
    Examples:
      numabench launch --instances 2 --batch 2
      numabench launch -n 4 -b 8 --seq 384 --model bert-base-cased -o results.json
      numabench launch --preset per-node --mode throughput --duration 30
      numabench launch --plan plan.yaml --mode throughput --duration 30 --repeat 5
      numabench launch -n 32 -c 1 --root /captured/c5.metal --dry-run
    """
    from pathlib import Path

    from numabench.launcher.launch import (
        check_options,
        check_workload,
        dry_run_text,
        refuse_foreign_root,
        run_launch,
    )
    from numabench.plans import plan_for_launch
    from numabench.results import render_summary
    from numabench.topology import read_machine

    plan_args = dict(plan_file=plan_file, instances=instances, cores_per_instance=cores_per_instance,
                     batch=batch, smt=smt, preset=preset, nodes=_list_option(nodes, "node"),
                     cpus=_list_option(cpus, "CPU"), core_kind=core_kind, leftover=leftover)
    if hosts is not None and not ray_address:
        raise NumabenchError("--hosts needs --ray ADDRESS (a cluster to launch on)")
    workload = build_workload(model=model, backend=backend, precision=precision, seq=seq, mode=mode,
                              iterations=iterations, duration_s=duration, warmup=warmup, seed=seed,
                              text_file=text_file, share_weights=share_weights, compute_us=compute_us,
                              cache_dir=cache_dir, ort_opt_level=ort_opt_level)
    opts = LaunchOptions(binder=binder, allocator=allocator, transport=transport, inflight=inflight,
                         loops=loops, omp_runtime=omp_runtime, pin_threads=pin_threads, start=start,
                         run_dir=Path(run_dir) if run_dir else None,
                         output=Path(output) if output else None, ready_timeout_s=ready_timeout,
                         request_timeout_s=request_timeout, repeat=repeat,
                         keep_weights=keep_weights,
                         weights_dir=str(Path(weights_dir).resolve()) if weights_dir else None)
    refuse_foreign_root(root, dry_run, "launch")
    if dry_run:
        if ray_address:
            raise NumabenchError("--dry-run plans against this machine or --root; drop --ray")
        machine = read_machine(root)
        plan = plan_for_launch(machine, **plan_args)
        check_workload(plan, workload)
        click.echo(dry_run_text(machine, plan), nl=False)
        return
    check_options(opts)  # destinations first: a bad -o is found before the machine is read
    if ray_address:  # the same plan on N cluster hosts with a common start (docs/cluster.md)
        from numabench.cluster.fleet import render_fleet, run_fleet

        doc = run_fleet(ray_address, hosts, plan_args, workload, opts, Path(output) if output else None)
        click.echo(json.dumps(doc["fleet"], indent=1) if as_json else render_fleet(doc))
        return
    machine = read_machine("/")  # with --ray each host reads and plans for itself
    plan = plan_for_launch(machine, **plan_args)
    check_workload(plan, workload)

    def saved(paths):
        click.echo(f"results: {', '.join(str(p) for p in paths)}", err=True)

    result = run_launch(machine, plan, workload, opts, on_saved=saved)
    if as_json:
        click.echo(json.dumps(result.summary.to_dict(), indent=1))
    else:
        click.echo(render_summary(result.summary, list(result.warnings)))


# ---- serve ----------------------------------------------------------------------------------
# (section owned by the daemon part)

endpoint_option = click.option(
    "--endpoint", help="The daemon's endpoint (default: $NUMABENCH_ENDPOINT, or the running "
                       "daemon's state file).")


@cli.command("serve")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False),
              help="YAML plan; instances with a seq_range form one pool per range.")
@click.option("--instances", "-n", type=int, help="Plan this many instances (one pool) instead of --plan.")
@click.option("--cores-per-instance", "-c", type=int, help="Physical cores per planned instance.")
@click.option("--smt", is_flag=True, help="Give each planned instance its cores' SMT siblings too.")
@click.option("--model", "-m", default=Workload.model, show_default=True,
              help="Built-in config (random weights), minilm, a local folder or a hub id.")
@click.option("--backend", type=click.Choice(sorted(BACKENDS)), default=Workload.backend,
              show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default=Workload.precision,
              show_default=True)
@share_weights_option
@weights_dir_option
@click.option("--bind", help="Client endpoint (default: ipc:// in a private 0700 folder). "
                             "tcp://127.0.0.1:PORT for loopback TCP.")
@click.option("--allow-public-bind", is_flag=True,
              help="Allow binding (and metrics) beyond loopback or a private folder. No authentication!")
@click.option("--queue-size", type=int, default=64, show_default=True,
              help="Waiting requests per pool; beyond it clients get a busy reply.")
@click.option("--max-batch", type=int, default=1, show_default=True,
              help="Micro-batching: rows per dispatch (1 = off).")
@click.option("--max-wait-ms", type=float, default=2.0, show_default=True,
              help="Micro-batching: longest wait for a fuller batch.")
@click.option("--inflight", type=int, default=2, show_default=True,
              help="Dispatches sent and unanswered per instance, so a worker never waits for "
                   "its next input.")
@click.option("--pad", type=click.Choice(["max", "bucket"]), default="max", show_default=True,
              help="Pad requests to the pool's max length, or to power-of-two buckets in its range.")
@click.option("--max-rows", type=int, default=64, show_default=True, help="Rows per request, at most.")
@click.option("--max-request-mb", type=float, default=64.0, show_default=True,
              help="Largest request message, all its frames together (bigger ones get an error).")
@click.option("--request-timeout", type=float, default=120.0, show_default=True,
              help="Seconds a request may wait and run before it is answered with an error.")
@click.option("--warmup", "-w", type=NOT_NEGATIVE, default=SERVE_WARMUP, show_default=True,
              help="Warm-up runs per pool shape, per instance.")
@click.option("--seed", type=NOT_NEGATIVE, default=Workload.seed, show_default=True)
@click.option("--compute-us", type=FiniteFloat(open_min=False),
              help="noop backend: fixed compute time per request, in microseconds.")
@binder_option
@allocator_option
@start_option
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Folder for the instance logs (default runs/serve-<time>-<pid>).")
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on 127.0.0.1:PORT (off by default).")
@ray_option
@click.option("--hosts", type=int, help="With --ray: run a daemon on this many hosts (default: all).")
@dry_run_root_options[0]
@dry_run_root_options[1]
@user_errors
def serve_cmd(plan_file, instances, cores_per_instance, smt, model, backend, precision, share_weights,
              weights_dir, bind, allow_public_bind, queue_size, max_batch, max_wait_ms, inflight, pad,
              max_rows, max_request_mb, request_timeout, warmup, seed, compute_us, binder, allocator,
              start, run_dir, metrics_port, ray_address, hosts, dry_run, root):
    """Keep the plan's instances warm and answer inference requests (until `numabench stop`).

    \b
    Examples:
      numabench serve --plan plans/article-smart-dispatch.yaml --model bert-base-cased
      numabench serve --instances 2 --model bert-tiny --max-batch 8 --max-wait-ms 2
    """
    import logging
    from pathlib import Path

    from numabench.daemon.server import ServeOptions, serve
    from numabench.plans import plan_for_launch
    from numabench.topology import read_machine

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="[serve] %(asctime)s %(levelname)s %(message)s")
    plan_args = dict(plan_file=plan_file, instances=instances, cores_per_instance=cores_per_instance,
                     smt=smt)
    _serve_dry_run(dry_run, root, ray_address, plan_args)  # returns only when there is no --dry-run
    if metrics_port is not None and ray_address:
        raise NumabenchError("--metrics-port is per daemon; with --ray use each host's daemon status")
    if hosts is not None and not ray_address:
        raise NumabenchError("--hosts needs --ray ADDRESS (a cluster to serve on)")
    machine = None if ray_address else read_machine("/")  # with --ray each host plans for itself
    plan = None if ray_address else plan_for_launch(machine, **plan_args)
    workload = build_workload(model=model, backend=backend, precision=precision, seed=seed,
                              warmup=warmup, share_weights=share_weights, compute_us=compute_us)
    opts = ServeOptions(
        workload=workload, weights_dir=str(Path(weights_dir).resolve()) if weights_dir else None,
        pad=pad, bind=bind, allow_public_bind=allow_public_bind,
        queue_size=queue_size, max_batch=max_batch, max_wait_ms=max_wait_ms, inflight=inflight,
        max_rows=max_rows,
        max_request_bytes=int(max_request_mb * (1 << 20)), request_timeout_s=request_timeout,
        binder=binder, allocator=allocator, start=start, run_dir=Path(run_dir) if run_dir else None,
        metrics_port=metrics_port)
    if ray_address:  # a daemon per cluster host behind one front end here (docs/cluster.md)
        from numabench.cluster.serve import run_cluster_serve

        sys.exit(run_cluster_serve(ray_address, hosts, plan_args, opts, bind=bind))
    sys.exit(serve(plan, opts, plan_file=str(Path(plan_file).resolve()) if plan_file else None,
                   machine=machine))


def _serve_dry_run(dry_run, root, ray_address, plan_args):
    """serve --dry-run: the plan and its pools (seq range column) on this machine or --root,
    then exit 0; nothing starts. --root without --dry-run is refused."""
    from numabench.launcher.launch import dry_run_text, refuse_foreign_root
    from numabench.plans import plan_for_launch
    from numabench.topology import read_machine

    refuse_foreign_root(root, dry_run, "serve")
    if not dry_run:
        return
    if ray_address:
        raise NumabenchError("--dry-run plans against this machine or --root; drop --ray")
    machine = read_machine(root)
    click.echo(dry_run_text(machine, plan_for_launch(machine, **plan_args), "serve"), nl=False)
    sys.exit(0)


@cli.command("status")
@endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the status document as JSON.")
@click.option("--timeout", type=float, default=10.0, show_default=True)
@user_errors
def status_cmd(endpoint, as_json, timeout):
    """Show the running daemon: pools, instances, load, latency percentiles."""
    from numabench.daemon.client import Client
    from numabench.daemon.render import render_status

    with Client(endpoint, timeout_s=timeout) as c:
        doc = c.status()
    click.echo(json.dumps(doc, indent=1) if as_json else render_status(doc))


@cli.command("stop")
@endpoint_option
@click.option("--timeout", type=float, default=120.0, show_default=True)
@user_errors
def stop_cmd(endpoint, timeout):
    """Drain the running daemon's queues, stop its workers and the daemon."""
    from numabench.daemon.client import Client

    with Client(endpoint, timeout_s=timeout) as c:
        reply = c.stop()
    click.echo(f"stopped daemon pid {reply.get('pid')}")


@cli.command("reload")
@click.argument("plan_file", metavar="[PLAN]", required=False, type=click.Path(dir_okay=False))
@endpoint_option
@user_errors
def reload_cmd(plan_file, endpoint):
    """Re-read the daemon's plan (or PLAN) and restart only the instances that changed."""
    from numabench.daemon.client import Client

    with Client(endpoint, timeout_s=30) as c:
        r = c.reload(plan_file)
    click.echo(f"reloaded {r['plan']}: kept {r['kept']}, stopping {r['stopped']}, "
               f"starting {r['started']}; pools {', '.join(r['pools'])}")


@cli.command("client")
@endpoint_option
@click.option("--text", "texts", multiple=True, help="Text to run (repeat for several rows; needs a tokenizer).")
@click.option("--seq", "-s", type=int, help="Random token ids of this length instead of text.")
@click.option("--rows", type=int, default=1, show_default=True, help="Rows of random ids (with --seq).")
@click.option("--vocab", type=int, default=1000, show_default=True, help="Random ids are below this.")
@click.option("--outputs", is_flag=True, help="Ask for the output array, not only its summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the reply header as JSON.")
@click.option("--timeout", type=float, default=60.0, show_default=True)
@user_errors
def client_cmd(endpoint, texts, seq, rows, vocab, outputs, as_json, timeout):
    """Send one request to the running daemon and print who served it and how fast."""
    import numpy as np

    from numabench.daemon.client import Client
    from numabench.errors import NumabenchError

    if bool(texts) == (seq is not None):
        raise NumabenchError("give --text or --seq (one of them)")
    with Client(endpoint, timeout_s=timeout) as c:
        if texts:
            reply = c.infer(texts=list(texts), want="outputs" if outputs else "summary")
        else:
            ids = np.random.default_rng().integers(0, vocab, size=(rows, seq), dtype=np.int64)
            reply = c.infer(input_ids=ids, want="outputs" if outputs else "summary")
    if as_json:
        click.echo(json.dumps(reply.header, indent=1))
        if not reply.ok:
            sys.exit(1)  # busy or error: scripts see it in the exit status too
    elif reply.ok:
        h = reply.header
        click.echo(f"ok: instance {h['instance']} (pool {h['pool']}), {h['rows']}x{h['seq']} tokens "
                   f"padded to {h['padded_seq']}; queue {h['queue_ns'] / 1e6:.2f} ms, in worker "
                   f"{h.get('worker_queue_ns', 0) / 1e6:.2f} ms, compute "
                   f"{h['compute_ns'] / 1e6:.2f} ms, total {h['total_ns'] / 1e6:.2f} ms; output "
                   f"{h['output']['shape']} checksum {h['output']['checksum']}")
    else:
        click.echo(f"{reply.status}: {reply.reason}", err=True)
        sys.exit(1)


# ---- sweep / report / compare ---------------------------------------------------------------
# (section owned by the experiments part)


@cli.command("sweep")
@click.argument("experiment", type=click.Path(dir_okay=False, exists=True))
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Results folder (default results/<experiment name>).")
@click.option("--resume", is_flag=True,
              help="Continue a sweep in this folder: skip finished points, rerun failed ones.")
@click.option("--dry-run", is_flag=True,
              help="Validate every point against this machine (or --root) and list them; run nothing.")
@click.option("--root", "root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="With --dry-run: validate against this captured sysfs tree (another machine's).")
@binder_option
@allocator_option
@ray_option
@inflight_option
@threading_options
@user_errors
def sweep_cmd(experiment, output, resume, dry_run, root, binder, allocator, ray_address, inflight,
              omp_runtime, pin_threads, start):
    """Run every point of an EXPERIMENT (YAML), saving each point's results as it finishes.

    \b
    Examples:
      numabench sweep plans/experiment-batch-scaling.yaml -o results/bs
      numabench sweep plans/experiment-batch-scaling.yaml -o results/bs --resume
      numabench sweep plans/experiment-smt.yaml --root /captured/c5.metal --dry-run
      numabench report results/bs
    """
    from numabench.experiments.runner import dry_run_text, plan_sweep, run_sweep
    from numabench.launcher.launch import LaunchOptions, refuse_foreign_root
    from numabench.topology import read_machine

    refuse_foreign_root(root, dry_run, "sweep")
    if ray_address and root != "/":
        raise NumabenchError("--root and --ray both name the machine to check against; give one")

    launch_opts = LaunchOptions(binder=binder, allocator=allocator, inflight=inflight,
                                omp_runtime=omp_runtime, pin_threads=pin_threads, start=start)
    if ray_address and not dry_run:  # each point runs on a whole cluster host (docs/cluster.md)
        from numabench.cluster.sweep import run_cluster_sweep

        outcome = run_cluster_sweep(ray_address, experiment, output, resume=resume,
                                    launch_opts=launch_opts)
        click.echo(f"{len(outcome.ran)} points run, {len(outcome.skipped)} skipped (finished earlier); "
                   f"results in {outcome.out_dir}; next: numabench report {outcome.out_dir}")
        return
    if ray_address:  # --dry-run: validate against the cluster's hosts, not this machine
        from numabench.cluster.sweep import reference_machine

        machine = reference_machine(ray_address)
    else:
        machine = read_machine(root)
    if dry_run:
        click.echo(dry_run_text(*plan_sweep(experiment, machine), machine))
        return
    outcome = run_sweep(machine, experiment, output, resume=resume, launch_opts=launch_opts)
    click.echo(f"{len(outcome.ran)} points run, {len(outcome.skipped)} skipped (finished earlier); "
               f"results in {outcome.out_dir}; next: numabench report {outcome.out_dir}")


@cli.command("report")
@click.argument("folder", type=click.Path(file_okay=False, exists=True))
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Where the CSV, figures and report.html go (default FOLDER/report).")
@user_errors
def report_cmd(folder, output):
    """Table (terminal and CSV), figures (PNG, SVG) and report.html of a sweep folder or a folder
    of results.

    \b
    A sweep folder reports only the points its manifest lists. Figures: one panel per sequence
    length, one line per batch size; report.html is one self-contained page to share:
      numabench report results/bs
    """
    from numabench.experiments.report import make_report

    rep = make_report(folder, output)
    click.echo(rep.table)
    click.echo(f"wrote {len(rep.files)} files in {rep.csv.parent}: "
               f"{', '.join(p.name for p in rep.files)}", err=True)


@cli.command("compare")
@click.argument("a_path", metavar="A", type=click.Path(exists=True))
@click.argument("b_path", metavar="B", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True,
              help="Print per metric: metric, ratio, ci, p, runs, verdict (and the run values).")
@click.option("--allow-different", is_flag=True,
              help="Compare even if model, backend, precision, mode, seq, batch, instances or machine differ.")
@user_errors
def compare_cmd(a_path, b_path, as_json, allow_different):
    """Runs B against runs A: ratio of medians, bootstrap interval, permutation p, verdict.

    \b
    A and B are each a results file, a run folder, or a folder holding several runs
    (searched recursively). 3 runs a side are needed for a verdict:
      numabench launch ... --run-dir runs/a/1   (and /2, /3; or --repeat 3)
      numabench compare runs/a runs/b
    """
    from numabench.experiments.compare import compare_paths, render_comparison

    c = compare_paths(a_path, b_path, allow_different=allow_different)
    if as_json:
        click.echo(json.dumps(c.to_dict(), indent=1))
    else:
        click.echo(render_comparison(c))


# ---- system ---------------------------------------------------------------------------------
# (section owned by the system part)


def system_show_options(f):
    """`numabench system` and `numabench system show` take the same options."""
    for option in reversed((
        root_option,
        click.option("--cpus", help="Judge these CPUs (a plan's, e.g. 0-3) instead of all usable ones."),
        click.option("--interval", type=click.FloatRange(0.05, 60), default=0.5, show_default=True,
                     help="Seconds to watch other processes' CPU time."),
        click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON (docs/system.md)."),
    )):
        f = option(f)
    return f


@cli.group("system", invoke_without_command=True, subcommand_metavar="[show | tune | reset]")
@system_show_options
@click.pass_context
def system_cmd(ctx, root, cpus, interval, as_json):
    """What on this machine makes measurements noisy or binding fail, and the fix (also: tune, reset)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(system_show, root=root, cpus=cpus, interval=interval, as_json=as_json)


@system_cmd.command("show")
@system_show_options
@user_errors
def system_show(root, cpus, interval, as_json):
    """Show each fact with a verdict (ok, warn, fail, unknown) and the fix."""
    from numabench.system import read_system, render_report

    report = read_system(root, _list_option(cpus, "CPU"), interval_s=interval)
    click.echo(json.dumps(report.to_dict(), indent=1) if as_json else render_report(report))


def _print_tune(result, verb):
    for c in result.changes:
        click.echo(f"{c.label}: {c.before} -> {c.after}" + (f" ({c.note})" if c.note else ""))
    for label in result.unchanged:
        click.echo(f"{label}: already set")
    for p in result.problems:
        click.echo(f"note: {p}", err=True)
    if not result.changes and not result.unchanged:
        click.echo(f"nothing to {verb} here")


state_option = click.option("--state-file", type=click.Path(dir_okay=False),
                            help="Where tune saves the previous settings (default /run/numabench/system-tune.json, "
                                 "inside the tree under --root).")


@system_cmd.command("tune")
@root_option
@click.option("--thp", type=click.Choice(["never", "madvise", "always"]),
              help="Also set transparent hugepages (default: leave them).")
@state_option
@user_errors
def system_tune(root, thp, state_file):
    """As root: governor performance, turbo off (and THP with --thp); `reset` restores them."""
    from numabench.system.tune import tune

    result = tune(root, thp=thp, state_file=state_file)
    _print_tune(result, "tune")
    if result.state_file:
        click.echo(f"previous settings saved in {result.state_file}; `numabench system reset` restores them")


@system_cmd.command("reset")
@root_option
@state_option
@user_errors
def system_reset(root, state_file):
    """As root: restore what `numabench system tune` changed."""
    from numabench.system.tune import reset

    result = reset(root, state_file=state_file)
    _print_tune(result, "reset")
    if result.state_file:
        click.echo(f"not everything was restored; what is left stays in {result.state_file}")
# ---- tune -----------------------------------------------------------------------------------
# (section owned by the tune part)


def _csv_option(value, what, convert=str):
    """A comma-separated option (--backend pytorch,onnxruntime) as a tuple, or None."""
    if value is None:
        return None
    try:
        return tuple(convert(v.strip()) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a list of {what} like 4,8") from None


_TUNE_SPEC_OPTIONS = ("model", "seq", "batch", "batch_per_instance", "objective", "max_latency_ms",
                      "percentile", "budget", "backend", "precision", "allocator", "smt", "instances",
                      "mode", "warmup", "seed", "trial_seconds", "name")


@cli.command("tune")
@click.argument("spec_file", metavar="[SPEC]", required=False, type=click.Path(dir_okay=False, exists=True))
@click.option("--model", "-m", default="bert-base-cased", show_default=True,
              help="Built-in config (random weights), minilm, a local folder or a hub id.")
@click.option("--seq", "-s", type=int, default=128, show_default=True, help="Sequence length in tokens.")
@click.option("--batch", "-b", help="Global batch(es), split over the instances: 8 or 8,16 "
                                    "(default: batch per instance 1,2,4,8 searched).")
@click.option("--batch-per-instance", help="Search these per-instance batches instead: 1,2,4,8.")
@click.option("--objective", type=click.Choice(["throughput", "latency"]), default="throughput",
              show_default=True, help="Highest throughput, or lowest step max latency for the batch.")
@click.option("--max-latency-ms", type=float, help="throughput: step max latency limit at --percentile.")
@click.option("--percentile", type=click.Choice(["50", "90", "99"]), default="90", show_default=True)
@click.option("--budget", type=float, default=300.0, show_default=True,
              help="Seconds of measuring in all (worker start-up included).")
@click.option("--backend", default="pytorch", show_default=True, help="Backends allowed: pytorch,onnxruntime.")
@click.option("--precision", default="fp32", show_default=True, help="Precisions allowed: fp32,bf16,int8.")
@click.option("--allocator", default="auto", show_default=True,
              help="auto (default plus every installed one) or a list: default,jemalloc,tcmalloc.")
@click.option("--smt", type=click.Choice(["auto", "off", "on", "both"]), default="auto", show_default=True,
              help="auto: with and without SMT siblings where the machine has SMT.")
@click.option("--instances", "-n", default="auto", show_default=True,
              help="Instance counts to try: auto (divisors of the core count and powers of two) or 1,2,4.")
@click.option("--mode", type=click.Choice(["split", "throughput"]), default="split", show_default=True)
@click.option("--warmup", "-w", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--trial-seconds", type=float, help="Screen trial length (confirm trials: twice); "
                                                   "default 1% of the budget, 0.5-10 s.")
@click.option("--name", help="Name of the tune (default tune-<model>-s<seq>-<objective>).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Folder for trials, best-plan.yaml, frontier.csv and the figure.")
@click.option("--resume", is_flag=True, help="Continue an interrupted tune in this folder.")
@binder_option
@click.pass_context
@user_errors
def tune_cmd(ctx, spec_file, model, seq, batch, batch_per_instance, objective, max_latency_ms,
             percentile, budget, backend, precision, allocator, smt, instances, mode, warmup, seed,
             trial_seconds, name, output, resume, binder):
    """Measure the way to the best plan for an objective (docs/tune.md).

    \b
    Examples:
      numabench tune --model bert-tiny --seq 32 --batch 8 --objective throughput --budget 60 -o tuned
      numabench tune --model bert-base-cased --seq 128 --max-latency-ms 200 -o tuned
      numabench tune docs/tune-example.yaml -o tuned
      numabench tune docs/tune-example.yaml -o tuned --resume
    """
    from numabench.experiments.tune import load_tune_spec, run_tune, spec_from_options
    from numabench.launcher.launch import LaunchOptions
    from numabench.topology import read_machine

    if spec_file:
        given = [f"--{k.replace('_', '-')}" for k in _TUNE_SPEC_OPTIONS
                 if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT]
        if given:
            raise NumabenchError(f"{', '.join(given)} cannot be combined with the spec {spec_file}, "
                                 "which already says what to tune: edit the spec or drop SPEC")
        spec = load_tune_spec(spec_file)
    else:
        spec = spec_from_options(
            model=model, seq=seq, batch=_csv_option(batch, "batches", int),
            batch_per_instance=_csv_option(batch_per_instance, "batches", int), objective=objective,
            max_latency_ms=max_latency_ms, percentile=float(percentile), budget_s=budget,
            backends=_csv_option(backend, "backends"), precisions=_csv_option(precision, "precisions"),
            allocators="auto" if allocator == "auto" else _csv_option(allocator, "allocators"),
            smt=smt, instances="auto" if instances == "auto" else _csv_option(instances, "counts", int),
            mode=mode, warmup=warmup, seed=seed, trial_s=trial_seconds, name=name)
    outcome = run_tune(read_machine("/"), spec, output, resume=resume,
                       launch_opts=LaunchOptions(binder=binder))
    click.echo(outcome.summary)
    click.echo(f"wrote {', '.join(p.name for p in outcome.files)} and every trial (points/) in "
               f"{outcome.out_dir}; next: numabench report {outcome.out_dir}", err=True)


def main():
    cli()


if __name__ == "__main__":
    main()
