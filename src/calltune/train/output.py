"""The training output folder: its state, the newest complete checkpoint, and the final model's atomic arrival.

Layout of a model folder ``OUT`` (`calltune.train.train`'s `output_dir`)::

    OUT/checkpoints/checkpoint-N/   full Trainer checkpoints (weights or adapter, optimizer, scheduler, RNG,
                                    trainer_state.json); the newest is kept
    OUT/checkpoints/runs/           TensorBoard logs
    OUT/*                           the final model (or adapter), tokenizer, calltune_format.json, train_log.json

While training runs, ``OUT`` holds ``checkpoints/`` only. The final model is written into a hidden sibling,
``.OUT.saving``, which then takes ``checkpoints/`` along and replaces ``OUT`` by a rename (`publish`), so a crash
never leaves model files in ``OUT`` that look finished but are not: ``OUT`` is *finished* (it holds
``calltune_format.json``), *in progress* (checkpoints, no model), or *empty*. A crash inside `publish` leaves a
complete ``.OUT.saving`` (its ``train_log.json`` is written before anything moves), which `prepare_output_dir`
moves into place at the next start.

Also which process writes (`is_main_process`) when a launcher runs several. Torch-free: the command
line checks folders with it before it loads anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from calltune.errors import CalltuneError

CHECKPOINTS = "checkpoints"  # under the model folder; also the Trainer's output_dir
FINISHED = "calltune_format.json"  # in a model folder only once it is published whole
LAST_WRITTEN = "train_log.json"  # the last file written into the staging folder before `publish`


class OutputDirError(CalltuneError):
    """An output folder that this run may not use as asked; the message names the flag that fixes it."""


_RANK = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")  # torchrun / accelerate, then MPI
_WORLD = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMI_SIZE")


def _env_int(names: tuple[str, ...], default: int) -> int:
    return next((int(os.environ[n]) for n in names if os.environ.get(n, "").isdigit()), default)


def world_size() -> int:
    """Processes training together, as the launcher (``accelerate launch``, ``torchrun``, mpirun) set them; 1 alone."""
    return _env_int(_WORLD, 1)


def is_main_process() -> bool:
    """Whether this is the process that writes files (global rank 0; the only one without a launcher)."""
    return _env_int(_RANK, 0) == 0


def staging_dir(output_dir: Path) -> Path:
    """The hidden sibling the final model is written into before `publish` renames it to `output_dir`."""
    return output_dir.parent / f".{output_dir.name}.saving"


def is_finished(output_dir: str | Path) -> bool:
    """Whether `output_dir` holds a published (complete) model."""
    return (Path(output_dir) / FINISHED).exists()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """``output_dir/checkpoints/checkpoint-N`` folders saved whole, oldest first.

    A checkpoint is whole when its ``trainer_state.json`` (the Trainer writes it after the weights,
    optimizer, scheduler and RNG state) parses and names step N; a kill during the save leaves it missing
    or cut short.
    """
    found = []
    for path in (Path(output_dir) / CHECKPOINTS).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if not step.isdigit():
            continue
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("global_step") == int(step):
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of `output_dir` (see `complete_checkpoints`), or None."""
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def _calltune_folder(path: Path) -> bool:
    """Whether `path` holds only what calltune's training writes (so ``--overwrite`` may delete it)."""
    return all(p.name == CHECKPOINTS or (path / FINISHED).exists() for p in path.iterdir())


def check_output_dir(output_dir: str | Path, resume: bool = False, overwrite: bool = False,
                     what: str = "output folder") -> None:
    """Whether training may write into `output_dir` with these flags; raises if not. Touches nothing.

    - absent or empty: a fresh run (``resume`` needs a checkpoint: refused).
    - checkpoints but no final model (an interrupted run): needs ``resume`` (continue from the newest
      complete checkpoint) or ``overwrite`` (start afresh).
    - a finished model: needs ``overwrite``; with ``resume`` there is nothing left to train (accepted:
      training returns the saved result).
    - anything else (files calltune did not write): refused, even with ``overwrite``.

    Raises:
        OutputDirError: naming the folder, what it holds, and the flag to pass.
    """
    out = Path(output_dir)
    if resume and overwrite:
        raise OutputDirError("--resume and --overwrite exclude each other: resume continues the run in "
                             f"{out}, overwrite starts it afresh; give one")
    stage = staging_dir(out)
    if stage.exists() and (stage / LAST_WRITTEN).exists():
        return  # a finished model whose move into place was cut short: prepare_output_dir completes it
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{what} {out} is a file, not a folder; give a folder path")
    entries = list(out.iterdir()) if out.is_dir() else []
    if not entries:
        if resume:
            raise OutputDirError(f"--resume: {what} {out} holds no checkpoint to resume from; start afresh instead "
                                 "(without --resume, or with --overwrite where the run folder is not empty)")
        return
    if not _calltune_folder(out):
        raise OutputDirError(f"{what} {out} is not empty and holds files calltune did not write "
                             f"({', '.join(sorted(p.name for p in entries)[:5])}); choose a new or empty folder")
    if is_finished(out):
        if not (resume or overwrite):
            raise OutputDirError(f"{what} {out} already holds a trained model; pass --overwrite to train it again "
                                 "(its checkpoints are deleted), or choose another folder")
        return
    checkpoint = latest_checkpoint(out)
    if overwrite:
        return
    if resume:
        if checkpoint is None:
            raise OutputDirError(f"--resume: {what} {out} holds no complete checkpoint (one is saved every "
                                 "train.save_steps steps); pass --overwrite to start afresh")
        return
    where = f"its newest complete checkpoint is {checkpoint.name}" if checkpoint else "no complete checkpoint"
    raise OutputDirError(f"{what} {out} holds an unfinished run ({where}) and no final model; pass --resume to "
                         "continue it from its newest checkpoint, or --overwrite to start afresh")


def prepare_output_dir(output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """`check_output_dir`, then make `output_dir` ready: finish a cut-short `publish`, drop a half-written
    staging folder, and with `overwrite` delete the earlier run's model and checkpoints.

    Call it on the main process only, before training starts.
    """
    out = Path(output_dir)
    stage = staging_dir(out)
    if stage.exists():
        if (stage / LAST_WRITTEN).exists():
            publish(stage, out)
        else:
            shutil.rmtree(stage)
    check_output_dir(out, resume=resume, overwrite=overwrite)
    if overwrite and out.exists():
        shutil.rmtree(out)


def publish(stage: Path, output_dir: Path) -> None:
    """Move the finished model in `stage` to `output_dir`, taking ``output_dir/checkpoints`` along.

    Each step is one rename, and every state between them is recognised by `prepare_output_dir`.
    """
    if (output_dir / CHECKPOINTS).exists():
        os.replace(output_dir / CHECKPOINTS, stage / CHECKPOINTS)
    if output_dir.exists():
        output_dir.rmdir()  # held only checkpoints/ (check_output_dir refuses anything else)
    os.replace(stage, output_dir)


def check_run_dir(run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> None:
    """Whether ``calltune run`` may use `run_dir`: empty or new; with `resume`, a run whose model folder
    (``run_dir/model``) can resume (`check_output_dir`); with `overwrite`, any earlier run of calltune.

    Raises:
        OutputDirError: naming the folder and the flag to pass.
    """
    run = Path(run_dir)
    model = run / "model"
    if resume or overwrite:
        check_output_dir(model, resume=resume, overwrite=overwrite, what="model folder")
        return
    if run.is_dir() and any(run.iterdir()):
        state = "a finished model" if is_finished(model) else (
            "an unfinished training run" if (model / CHECKPOINTS).exists() else "files of an earlier run")
        raise OutputDirError(f"run folder {run} is not empty (it holds {state}); pass --resume to continue its "
                             "training from the newest checkpoint (a finished model is kept and evaluated), or "
                             "--overwrite to run again into it")
