"""Command line: parse, call one function, print. No logic lives here."""
from __future__ import annotations

import functools
import json
import sys

import click

from numabench import __version__
from numabench.errors import NumabenchError


def user_errors(fn):
    """Print a NumabenchError as one clear message (no traceback) and exit non-zero."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NumabenchError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


root_option = click.option(
    "--root", "root", default="/", show_default=True, type=click.Path(file_okay=False),
    help="Read the machine from this filesystem root (a captured sysfs tree) instead of the live system.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="numabench")
def cli():
    """Run pinned, NUMA-local instances of BERT-like models and measure them."""


# ---- topology -------------------------------------------------------------------------------
# (section owned by the topology part)


@cli.command()
@root_option
@click.option("--lscpu", "lscpu_file", type=click.File("r"), default=None,
              help="Cross-check against (and fill gaps from) saved "
                   "`LC_ALL=C lscpu -a -p=CPU,CORE,SOCKET,NODE,ONLINE` output.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the stable JSON document (docs/topology-json.md).")
@user_errors
def topology(root, lscpu_file, as_json):
    """Show packages, NUMA nodes, cores and the CPUs this process may use."""
    import json

    from numabench.topology import machine_to_dict, read_machine, render_machine

    machine = read_machine(root, lscpu_text=lscpu_file.read() if lscpu_file else None)
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
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a {what} list like 0-3,8") from None


@cli.group("plan", invoke_without_command=True, subcommand_metavar="[show PLAN | validate PLAN]")
@click.option("--instances", "-n", type=int, help="Number of instances (equal groups of cores).")
@click.option("--cores-per-instance", "-c", type=int,
              help="Physical cores per instance (derives --instances; checked against it if both).")
@click.option("--batch", "-b", type=int,
              help="Global batch, split evenly, larger shares first (default: 1 per instance).")
@click.option("--smt", is_flag=True, help="Give each instance its cores' SMT siblings too.")
@click.option("--nodes", help="Use only these NUMA nodes, e.g. 0 or 0,1.")
@click.option("--cpus", help="Use only these CPUs, e.g. 0-23,48-71.")
@click.option("--core-kind", type=click.Choice(["performance", "efficiency", "uniform", "any"]),
              help="Hybrid CPUs: which cores (default: the fastest kind present; any = mix).")
@click.option("--leftover", type=click.Choice(["idle", "spread"]),
              help="Cores left over by equal groups: keep idle (default) or spread one by one "
                   "over the first groups of their node.")
@click.option("--preset", help="per-socket, per-node, latency, throughput, smart-dispatch, or a "
                               "preset YAML file (docs/plans.md).")
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
    from pathlib import Path

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
    request = load_preset(preset) if preset else PlanRequest()
    plan = make_plan(read_machine(root), dataclasses.replace(request, **asked))
    text = dump_plan(plan)
    if output:
        Path(output).write_text(text)
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


@cli.command("launch")
@click.option("--instances", "-n", type=int, help="Number of instances (default: 1, or the plan's).")
@click.option("--cores-per-instance", "-c", type=int, help="Physical cores per instance (derives --instances).")
@click.option("--batch", "-b", type=int, help="Global batch, split over the instances (default 8, or the plan's).")
@click.option("--seq", "-s", type=int, default=128, show_default=True, help="Sequence length in tokens.")
@click.option("--model", "-m", default="bert-base-cased", show_default=True,
              help="Built-in config (random weights), minilm, a local folder or a hub id.")
@click.option("--backend", default="pytorch", show_default=True, help="pytorch or noop.")
@click.option("--precision", default="fp32", show_default=True, help="fp32, bf16 or int8.")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False),
              help="Use this YAML plan instead of planning.")
@click.option("--smt", is_flag=True, help="Give each instance its cores' SMT siblings too.")
@click.option("--iterations", "-i", type=int,
              help="Steps (split) or requests per instance (throughput); default 20.")
@click.option("--duration", "-d", type=float, help="Measure for this many seconds instead of --iterations.")
@click.option("--warmup", "-w", type=int, default=3, show_default=True,
              help="Warm-up runs per instance on the exact shapes.")
@click.option("--mode", type=click.Choice(["split", "throughput"]), default="split", show_default=True,
              help="split: each step splits the batch over all instances; "
              "throughput: each instance runs its own shards back to back.")
@click.option("--text", "text_file", type=click.Path(dir_okay=False),
              help="Real text, one sample per line (needs a tokenizer).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random token ids.")
@click.option("--compute-us", type=float, help="noop backend: fixed compute time per request, in microseconds.")
@click.option("--binder", type=click.Choice(["auto", "numactl", "taskset", "self"]), default="auto", show_default=True)
@click.option("--allocator", type=click.Choice(["default", "jemalloc", "tcmalloc"]), default="default",
              show_default=True, help="Preload an allocator library (recorded in the results).")
@click.option("--transport", type=click.Choice(["ipc", "tcp"]), default="ipc", show_default=True)
@click.option("--run-dir", type=click.Path(file_okay=False),
              help="Folder for logs and results (default runs/<time>-<pid>).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="Also write the results JSON here.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON instead of a table.")
@user_errors
def launch_cmd(instances, cores_per_instance, batch, seq, model, backend, precision, plan_file, smt,
               iterations, duration, warmup, mode, text_file, seed, compute_us, binder, allocator,
               transport, run_dir, output, as_json):
    """Run pinned instances of a model and report latency and throughput.

    \b
    Examples:
      numabench launch --instances 2 --batch 2
      numabench launch -n 4 -b 8 --seq 384 --model bert-base-cased -o results.json
      numabench launch --plan plans/article-4x12.yaml --mode throughput --duration 30
    """
    from pathlib import Path

    from numabench.launcher.launch import LaunchOptions, Workload, plan_for_launch, run_launch
    from numabench.results import render_summary, summary_from_dict
    from numabench.topology import read_machine

    machine = read_machine("/")
    plan = plan_for_launch(machine, plan_file=plan_file, instances=instances,
                           cores_per_instance=cores_per_instance, batch=batch, smt=smt)
    options = {"compute_ns": int(compute_us * 1000)} if compute_us is not None else {}
    workload = Workload(model=model, backend=backend, precision=precision, seq=seq, mode=mode,
                        iterations=iterations, duration_s=duration, warmup=warmup, seed=seed,
                        text_file=text_file, backend_options=options)
    opts = LaunchOptions(binder=binder, allocator=allocator, transport=transport,
                         run_dir=Path(run_dir) if run_dir else None,
                         output=Path(output) if output else None)

    def saved(paths):
        click.echo(f"results: {', '.join(str(p) for p in paths)}", err=True)

    doc = run_launch(machine, plan, workload, opts, on_saved=saved)
    if as_json:
        click.echo(json.dumps(doc["summary"], indent=1))
    else:
        click.echo(render_summary(summary_from_dict(doc["summary"]), doc["warnings"]))


def main():
    cli()


if __name__ == "__main__":
    main()
