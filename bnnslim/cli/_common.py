"""What every command shares: consoles, option types and error handling."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from bnnslim.errors import BnnslimError, BnnslimWarning


class _Console(Console):
    """Rich's console, with a closed output pipe (``| head``) ending the command as a shell expects: status 141."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141)


# Under torchrun only rank 0 speaks (RANK is set by torchrun before Python starts).
IS_MAIN_PROCESS = int(os.environ.get("RANK", "0")) == 0
console = _Console(quiet=not IS_MAIN_PROCESS)
err_console = _Console(stderr=True, quiet=not IS_MAIN_PROCESS)

F = TypeVar("F", bound=Callable[..., Any])

RunOption = Annotated[Path, typer.Option("--run", help="Run directory shared by bnnslim's commands.")]
DEFAULT_RUN = Path("bnnslim-run")
ModelOption = Annotated[str | None, typer.Option(
    "--model", help="The model code you trust: FILE[:NAME] (the .py the model was made with; its sha256 must match) "
                    "or PREFIX:NAME. Needed for a file or run that this account's bnnslim did not make.")]
TrustSourceOption = Annotated[bool, typer.Option(
    "--trust-source",
    help="Import the model file that the file or run records (only if you trust where it came from).")]


def friendly_errors(fn: F) -> F:
    """Turn expected errors into one line on stderr and exit code 1; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", BnnslimWarning)
                shown = warnings.showwarning

                def show(message: Any, category: type[Warning], *rest: Any, **kw: Any) -> None:
                    if issubclass(category, BnnslimWarning):
                        err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False,
                                          soft_wrap=True)
                    else:
                        shown(message, category, *rest, **kw)

                warnings.showwarning = show
                return fn(*args, **kwargs)
        except BnnslimError as exc:
            line = " ".join(part.strip() for part in exc.one_line().splitlines() if part.strip())
            err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except BrokenPipeError:  # `bnnslim ... | head`: the reader left; nothing is wrong with the command
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except Exception as exc:  # only the expected failures of _expected_failure become a message
            error, everywhere = _expected_failure(exc)
            if error is None:
                raise
            # a stalled process may be rank 0, which alone speaks otherwise: every process says it
            console_ = Console(stderr=True) if everywhere else err_console
            console_.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: files written so far are intact; "
                              "rerun with --resume to continue", highlight=False)
            raise typer.Exit(130) from None
        finally:
            if "torch.distributed" in sys.modules:
                from bnnslim.distributed import shutdown

                shutdown()

    return wrapper  # type: ignore[return-value]


_OUT_OF_MEMORY = ("can't allocate memory", "DefaultCPUAllocator", "out of memory", "Cannot allocate memory")


def _expected_failure(exc: Exception) -> tuple[BnnslimError | None, bool]:
    """An expected failure outside bnnslim's control as a one-line error (and whether every rank says it)."""
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError)
                                        and any(w in str(exc) for w in _OUT_OF_MEMORY)):
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return BnnslimError(f"out of memory ({first})",
                            "use a smaller --batch-size / --batch or --input-shape, or more memory"), False
    if "torch.distributed" in sys.modules:
        from bnnslim.distributed import stalled_error

        stalled = stalled_error(exc)
        if stalled is not None:
            return stalled, True  # type: ignore[return-value]
    return None, False


def locks_run(command: str) -> Callable[[F], F]:
    """Hold the lock of the command's ``--run`` directory while it runs (:mod:`bnnslim.runlock`)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from bnnslim.runlock import run_lock

            with run_lock(Path(kwargs.get("run") or DEFAULT_RUN), command):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
