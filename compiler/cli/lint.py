"""``fxpress lint``: check a Q/DQ ONNX model against a runtime's quantisation rules.

The rule sets live with their backends (TensorRT's in :mod:`backends.tensorrt.lint`); this
module names them and imports the one asked for only when the command runs, so ``fxpress``
starts without onnx-graphsurgeon.
"""

from __future__ import annotations

import importlib
import json

import click

FINDINGS_EXIT_CODE = 6  # the accuracy exit code: the model is not what the runtime will run fast
# rule set -> (module, linter function): each module also holds its RULES mapping
RULE_SETS = {"tensorrt": ("backends.tensorrt.lint", "lint_tensorrt")}


def _rule_set(name: str):
    """The module that holds rule set ``name``."""
    return importlib.import_module(RULE_SETS[name][0])


class _LintCommand(click.Command):
    """Lists every rule under ``--help``, read from the rule sets when help is asked for."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        for name in RULE_SETS:
            rows = [(rule, f"{slug}: {description}") for rule, (slug, description) in _rule_set(name).RULES.items()]
            with formatter.section(f"Rules ({name})"):
                formatter.write_dl(rows)


@click.command("lint", cls=_LintCommand)
@click.argument("model")
@click.option("--rules", type=click.Choice(sorted(RULE_SETS)), default="tensorrt", show_default=True,
              help="The runtime whose Q/DQ rules to check.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
@click.pass_context
def lint_command(ctx: click.Context, model: str, rules: str, as_json: bool) -> None:
    """Check the Q/DQ placement of MODEL (an ONNX file); exit 6 when there are findings.

    \b
    Examples:
      fxpress lint out/model.onnx
      fxpress lint model.qdq.onnx --rules tensorrt --json
    """  # noqa: D301 - click needs a real \b (backspace) to keep the examples unwrapped
    findings = getattr(_rule_set(rules), RULE_SETS[rules][1])(model)
    if as_json:
        records = [finding.to_dict() for finding in findings]
        click.echo(json.dumps({"model": model, "rules": rules, "findings": records, "count": len(findings)},
                              indent=2))
    else:
        for finding in findings:
            where = f" [{finding.module_path}]" if finding.module_path else ""
            click.echo(f"{finding.rule} {finding.name} {finding.node}{where}: {finding.message}")
        click.echo(f"{len(findings)} finding(s)")
    if findings:
        ctx.exit(FINDINGS_EXIT_CODE)
