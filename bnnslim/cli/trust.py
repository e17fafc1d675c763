"""``bnnslim trust``: let this account's bnnslim use a run directory's recorded model file."""

from __future__ import annotations

from rich.markup import escape

from bnnslim.cli._common import DEFAULT_RUN, RunOption, console, friendly_errors


@friendly_errors
def trust_command(run: RunOption = DEFAULT_RUN) -> None:
    """Trust the model file a run directory records (after checking its sha256), as if you had made the run here.

    bnnslim imports a run's recorded model file only when this account's bnnslim
    made the run (its manifest is signed). Use this for a run made by an older
    bnnslim or under another account, once you have checked the model file.
    """
    from bnnslim.run_model import trust_run
    from bnnslim.rundir import RunDir

    recorded = trust_run(RunDir(run))
    what = "plugin model" if recorded.is_plugin else "model file"
    console.print(f"trusted: run {escape(str(run))} uses the {what} {escape(recorded.spec)} "
                  f"(sha256 {recorded.sha256[:16]}...)", highlight=False)
