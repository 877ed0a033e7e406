"""Resuming training and the output folder's rules (`calltune.train.output`).

A run killed with SIGKILL after a checkpoint resumes (``calltune train --resume``) to the same steps,
losses and weights as a run never interrupted; a folder holding an unfinished run, a finished model or
foreign files is refused with the flag that fixes it; a final model whose move into place was cut
short is completed, and a half-written one dropped; resuming a finished run trains nothing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from calltune.cli import app
from calltune.train.output import (LAST_WRITTEN, OutputDirError, check_output_dir, check_run_dir, latest_checkpoint,
                                   prepare_output_dir, staging_dir)
from tiny_training import PYTHON, ROOT, adapter_weights, env, losses, tiny_base, write_data, write_recipe

runner = CliRunner()


def checkpoint(out: Path, step: int, whole: bool = True) -> Path:
    """A checkpoint folder as the Trainer leaves it: whole (trainer_state.json written last) or cut short."""
    folder = out / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    if whole:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return folder


def finished(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_model.safetensors", "calltune_format.json", LAST_WRITTEN):
        (out / name).write_text("{}")
    return out


def refused(out: Path, *words: str, **flags) -> str:
    with pytest.raises(OutputDirError) as err:
        check_output_dir(out, **flags)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    return str(err.value)


def test_the_newest_whole_checkpoint_is_the_one_resumed(tmp_path):
    out = tmp_path / "model"
    assert latest_checkpoint(out) is None
    checkpoint(out, 2)
    checkpoint(out, 10)
    checkpoint(out, 12, whole=False)  # killed while saving
    (out / "checkpoints" / "checkpoint-14").mkdir()
    (out / "checkpoints" / "checkpoint-14" / "trainer_state.json").write_text('{"global_st')  # cut mid-write
    assert latest_checkpoint(out).name == "checkpoint-10"  # by step number, not by name order


def test_output_folder_states_and_the_flag_each_needs(tmp_path):
    out = tmp_path / "model"
    check_output_dir(out)  # new
    out.mkdir()
    check_output_dir(out)  # empty
    refused(out, "no checkpoint", resume=True)
    checkpoint(out, 4)
    message = refused(out, str(out), "unfinished run", "checkpoint-4", "--resume", "--overwrite")
    assert "\n" not in message
    check_output_dir(out, resume=True)
    check_output_dir(out, overwrite=True)
    refused(out, "--resume and --overwrite", resume=True, overwrite=True)
    finished(out)
    refused(out, "already holds a trained model", "--overwrite")
    check_output_dir(out, resume=True)  # nothing left to train: the saved result is returned
    check_output_dir(out, overwrite=True)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    refused(other, "notes.txt", "new or empty folder")
    refused(other, "notes.txt", overwrite=True)  # --overwrite deletes only what calltune wrote


def test_run_folder_rules(tmp_path):
    run = tmp_path / "run"
    check_run_dir(run)
    run.mkdir()
    check_run_dir(run)
    (run / "rejects.jsonl").write_text("")
    checkpoint(run / "model", 3)
    with pytest.raises(OutputDirError, match="unfinished training run.*--resume.*--overwrite"):
        check_run_dir(run)
    check_run_dir(run, resume=True)
    check_run_dir(run, overwrite=True)


def test_a_cut_short_publish_is_completed_and_a_half_written_model_dropped(tmp_path):
    out = tmp_path / "model"
    stage = staging_dir(out)
    # killed after the checkpoints moved into the finished staging folder, before the rename
    finished(stage)
    checkpoint(stage, 6)
    out.mkdir()
    check_output_dir(out, resume=True)
    prepare_output_dir(out, resume=True)
    assert not stage.exists() and (out / "calltune_format.json").exists()
    assert latest_checkpoint(out).name == "checkpoint-6"
    # killed while the final model was being written: the staging folder is dropped, the checkpoints stay
    out2 = tmp_path / "model2"
    checkpoint(out2, 2)
    stage2 = staging_dir(out2)
    stage2.mkdir()
    (stage2 / "adapter_model.safetensors").write_bytes(b"half")
    prepare_output_dir(out2, resume=True)
    assert not stage2.exists() and latest_checkpoint(out2).name == "checkpoint-2"
    # --overwrite deletes the earlier run's model and checkpoints
    prepare_output_dir(out, overwrite=True)
    assert not out.exists()


@pytest.fixture
def tiny_recipe(tmp_path, tokenizer):
    base = tiny_base(tmp_path, tokenizer)
    return write_recipe(tmp_path / "tiny.yaml", base, write_data(tmp_path / "data.jsonl"),
                        max_steps=12, batch_size=2, save_steps=5, learning_rate=2e-2)


def test_the_command_line_refuses_a_half_written_folder_before_reading_data(tmp_path, tiny_recipe, monkeypatch):
    import calltune.pipeline

    def reached(*args, **kwargs):
        raise AssertionError("the command got past its folder checks")

    monkeypatch.setattr(calltune.pipeline, "prepare", reached)
    monkeypatch.setattr(calltune.pipeline, "run_recipe", reached)
    model = tmp_path / "run" / "model"
    checkpoint(model, 5)
    for args in (["train", tiny_recipe, "-o", model], ["run", tiny_recipe, "-o", model.parent]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        assert "--resume" in result.output and "--overwrite" in result.output, result.output
    result = runner.invoke(app, ["train", str(tiny_recipe), "-o", str(tmp_path / "new"), "--resume"])
    assert result.exit_code == 2 and "no checkpoint" in result.output, result.output


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_result_of_an_uninterrupted_one(tmp_path, tiny_recipe):
    reference = tmp_path / "reference" / "model"
    result = runner.invoke(app, ["train", str(tiny_recipe), "-o", str(reference)])
    assert result.exit_code == 0, result.output

    out = tmp_path / "killed" / "model"
    proc = subprocess.Popen([PYTHON, str(ROOT / "tests" / "tiny_training.py"), str(tiny_recipe), str(out), "0.5"],
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stopped_at = int(latest_checkpoint(out).name.removeprefix("checkpoint-"))
    assert stopped_at < 12 and not (out / "calltune_format.json").exists()  # killed mid-run: nothing looks finished

    again = runner.invoke(app, ["train", str(tiny_recipe), "-o", str(out)])
    assert again.exit_code == 2 and "--resume" in again.output, again.output
    resumed = runner.invoke(app, ["train", str(tiny_recipe), "-o", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert ": 12 steps" in " ".join(resumed.output.split())  # rich wraps the line

    history = json.loads((out / "train_log.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 13))  # each step once, across the kill
    assert losses(out) == pytest.approx(losses(reference), rel=1e-5)
    assert losses(reference)[-1] < losses(reference)[0]  # it learns: the comparison can tell runs apart
    got, want = adapter_weights(out), adapter_weights(reference)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(want[name].abs().max() > 0 for name in want if "lora_B" in name)  # B starts at 0: it moved
    assert json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())["global_step"] == 12
    assert not staging_dir(out).exists()

    # resuming a finished run trains nothing and reports the saved result (as `calltune run --resume` does
    # when only the evaluation was cut short)
    saved = (out / "adapter_model.safetensors").stat().st_mtime_ns
    again = runner.invoke(app, ["train", str(tiny_recipe), "-o", str(out), "--resume"])
    assert again.exit_code == 0 and ": 12 steps" in " ".join(again.output.split()), again.output
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == saved
