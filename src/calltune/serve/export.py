"""Exporting a tuned model for other runtimes: full HF safetensors, and GGUF through llama.cpp.

Owns `export_hf` (a LoRA adapter merged into its base; a full model copied as safetensors) and
`export_gguf`, which runs llama.cpp's own converter (``convert_hf_to_gguf.py``, the maintained one;
its architecture tables move with llama.cpp) on the merged model. The converter is found through
``--converter``, ``$LLAMA_CPP_DIR`` or ``PATH``; failing those, `fetch_converter` takes it from the
source distribution of ``llama-cpp-python`` on PyPI (which vendors llama.cpp under
``vendor/llama.cpp/``) and caches it under ``$CALLTUNE_HOME/llama.cpp/``. The GGUF carries the chat
template of the model's saved tokenizer as ``tokenizer.chat_template`` (the converter copies it).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from calltune.errors import CalltuneError
from calltune.models import calltune_home, is_adapter, resolve_model

CONVERTER = "convert_hf_to_gguf.py"
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")
LLAMA_CPP_PYTHON = "0.3.36"  # checked: converts SmolLM2 (Llama) as transformers 5 saves it (rope in `rope_parameters`)
# what the converter needs from the sdist's vendor/llama.cpp/: itself, its model classes, its own gguf
# package, and the chat templates some model classes read; files, then folders
_SDIST_ROOT = "vendor/llama.cpp/"
_SDIST_FILES = (CONVERTER, "LICENSE")
_SDIST_DIRS = ("conversion/", "gguf-py/gguf/", "models/templates/", "requirements/")
# import name -> PyPI name, for the converter's requirements whose names differ
_PIP_NAMES = {"yaml": "pyyaml", "google": "protobuf"}

log = logging.getLogger(__name__)


class ConverterNotFound(FileNotFoundError):
    """llama.cpp's convert_hf_to_gguf.py is not available; the message says how to get it."""


def export_hf(model: str, output: str | Path) -> Path:
    """Full HF safetensors (with tokenizer and prompt format) that plain transformers loads."""
    from calltune.formats import load_format, save_format
    from calltune.models import load_model
    from calltune.train import merge_adapter

    path = resolve_model(model)
    output = Path(output)
    if is_adapter(path):
        return merge_adapter(path, output)
    loaded, tokenizer, _ = load_model(path)
    loaded.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    fmt = load_format(path)
    if fmt is not None:
        save_format(fmt, output)
    return output


def _manual_steps() -> str:
    return ("  git clone --depth 1 https://github.com/ggml-org/llama.cpp\n"
            "  pip install -r llama.cpp/requirements/requirements-convert_hf_to_gguf.txt\n"
            "  calltune export MODEL --format gguf -o model.gguf --converter llama.cpp/convert_hf_to_gguf.py")


def converter_cache(version: str = LLAMA_CPP_PYTHON, cache_dir: str | Path | None = None) -> Path:
    """The folder that holds (or will hold) the converter of ``llama-cpp-python==version``:
    ``cache_dir/llama-cpp-python-VERSION``, `cache_dir` defaulting to ``$CALLTUNE_HOME/llama.cpp``."""
    return Path(cache_dir or calltune_home() / "llama.cpp") / f"llama-cpp-python-{version}"


def _extract_converter(sdist: Path, dest: Path) -> None:
    """Copy the converter's files (`_SDIST_FILES`, `_SDIST_DIRS`) out of the sdist's vendor/llama.cpp/ into `dest`."""
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            top, sep, rel = member.name.partition("/" + _SDIST_ROOT)
            if not sep or "/" in top or not member.isfile() or ".." in PurePosixPath(rel).parts:
                continue
            if rel in _SDIST_FILES or rel.startswith(_SDIST_DIRS):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    if not (dest / CONVERTER).is_file():
        raise ConverterNotFound(f"{sdist.name} has no {_SDIST_ROOT}{CONVERTER}; pin another llama-cpp-python version")


def download_sdist(version: str, dest: Path) -> Path:
    """The ``llama-cpp-python==version`` source distribution (llama.cpp's tree under ``vendor/llama.cpp/``),
    downloaded into `dest` with ``python -m pip download --no-deps --no-binary :all:`` (so pip's index
    settings apply).

    Returns:
        The ``.tar.gz`` in `dest`.

    Raises:
        ConverterNotFound: pip failed; the message gives the command and the tail of pip's output.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(dest),
           f"llama-cpp-python=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    sdist = Path(dest) / f"llama_cpp_python-{version}.tar.gz"
    if done.returncode != 0 or not sdist.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        what = f"failed (exit {done.returncode})" if done.returncode else f"left no {sdist.name}"
        raise ConverterNotFound(f"`python -m pip download --no-deps --no-binary :all: llama-cpp-python=={version}` "
                                f"{what}:\n{tail}")
    return sdist


def fetch_converter(version: str = LLAMA_CPP_PYTHON, cache_dir: str | Path | None = None) -> Path:
    """llama.cpp's converter from the ``llama-cpp-python==version`` sdist on PyPI, downloaded once.

    Runs ``python -m pip download --no-deps --no-binary :all:`` (so pip's index settings apply), keeps
    only the converter, its ``conversion/`` package, the vendored ``gguf-py/gguf`` it was written
    against and ``models/templates/`` (a few MB of the ~75 MB sdist) in `converter_cache`, and
    deletes the download. Later calls return the cached script without running pip.

    Returns:
        The cached ``convert_hf_to_gguf.py``.

    Raises:
        ConverterNotFound: pip could not fetch the sdist (offline, no PyPI); the message gives pip's
            error and the commands that get the converter by hand.
    """
    target = converter_cache(version, cache_dir)
    script = target / CONVERTER
    if script.is_file():
        return script
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("llama.cpp's %s is not cached: downloading the llama-cpp-python==%s source (~75 MB) "
                "with pip into %s", CONVERTER, version, target)
    # staged next to the cache and renamed, so an interrupted download never leaves a half-written cache
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as tmp:
        try:
            sdist = download_sdist(version, Path(tmp) / "sdist")
        except ConverterNotFound as err:
            raise ConverterNotFound(
                f"GGUF export needs llama.cpp's {CONVERTER}, which calltune takes from the llama-cpp-python "
                f"source on PyPI, but {err}\nRerun where pip reaches PyPI (pip's own settings, e.g. PIP_INDEX_URL, "
                f"apply), or get the converter by hand:\n{_manual_steps()}") from None
        staging = Path(tmp) / "llama.cpp"
        _extract_converter(sdist, staging)
        try:
            staging.rename(target)
        except OSError:
            if not script.is_file():  # not a concurrent fetch that finished first
                raise
    return script


def find_converter(converter: str | Path | None = None) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py``, looked for in this order:

    1. `converter`, when given (it must exist);
    2. ``$LLAMA_CPP_DIR/convert_hf_to_gguf.py``;
    3. ``convert_hf_to_gguf.py`` or ``convert-hf-to-gguf`` on ``PATH``;
    4. `fetch_converter`: the copy cached from the ``llama-cpp-python`` sdist (version
       `LLAMA_CPP_PYTHON`), downloaded with pip on first use.

    Raises:
        ConverterNotFound: `converter` does not exist, or nothing was found and the download failed;
            the message gives the commands to get it.
    """
    if converter:
        if Path(converter).is_file():
            return Path(converter)
        raise ConverterNotFound(
            f"--converter {converter} does not exist. Leave --converter out to let calltune fetch llama.cpp's "
            f"{CONVERTER} from PyPI (the llama-cpp-python=={LLAMA_CPP_PYTHON} source), or get it by hand:\n"
            f"{_manual_steps()}")
    candidates = []
    if os.environ.get("LLAMA_CPP_DIR"):
        candidates.append(Path(os.environ["LLAMA_CPP_DIR"]) / CONVERTER)
    for name in (CONVERTER, "convert-hf-to-gguf"):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return fetch_converter()


def _converter_env(script: Path) -> dict[str, str]:
    """The environment of the converter: the gguf-py shipped beside it first on ``PYTHONPATH``
    (the installed ``gguf`` package may be older or newer than the one the converter was written for)."""
    env = dict(os.environ)
    local = script.parent / "gguf-py"
    if local.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(local)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _failure(cmd: list[str], done: subprocess.CompletedProcess, script: Path) -> RuntimeError:
    """The error for a failed conversion: a missing requirement by name, else the converter's last lines."""
    output = (done.stderr or "") + (done.stdout or "")
    missing = re.search(r"No module named '([\w.]+)'", output)
    if missing:
        module = missing.group(1).split(".")[0]
        name = _PIP_NAMES.get(module, module)
        requirements = script.parent / "requirements" / "requirements-convert_hf_to_gguf.txt"
        where = f" (its requirements: {requirements})" if requirements.is_file() else ""
        return RuntimeError(f"llama.cpp's converter needs the Python package {name!r}{where}: run `pip install {name}`")
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
    return RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{tail}")


def _check_chat_template(folder: Path) -> None:
    """Refuse a folder whose two chat templates disagree: transformers reads ``chat_template.jinja`` first,
    llama.cpp's converter ``tokenizer_config.json``'s ``chat_template`` first, so the GGUF would carry the other."""
    config, jinja = folder / "tokenizer_config.json", folder / "chat_template.jinja"
    if not (config.is_file() and jinja.is_file()):
        return
    stale = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(stale, str) and stale != jinja.read_text(encoding="utf-8"):
        raise CalltuneError(f"{config} has a chat_template that differs from {jinja}, which transformers uses; "
                         f"llama.cpp's converter would embed the one in {config.name}: delete that field, or make "
                         "the two equal")


def export_gguf(model: str, output: str | Path, outtype: str = "q8_0", converter: str | Path | None = None) -> Path:
    """Convert `model` (merged first if it is a LoRA adapter) to one GGUF file with llama.cpp's converter.

    `outtype` is the converter's ``--outtype`` (`OUTTYPES`): ``f32``/``f16``/``bf16`` keep the weights
    (bf16 exactly when the model is stored in bf16), ``q8_0`` quantises them to 8 bits, ``auto`` picks
    from the stored dtype. The model's tokenizer chat template becomes ``tokenizer.chat_template``.

    Raises:
        ConverterNotFound: see `find_converter` (checked, and fetched if needed, before anything is merged).
        ValueError: unknown `outtype`; a folder whose tokenizer_config.json and chat_template.jinja hold
            different chat templates.
        RuntimeError: the converter failed (a missing Python package by name, else its output).
    """
    if outtype not in OUTTYPES:
        raise CalltuneError(f"unknown GGUF outtype {outtype!r}; choices: {', '.join(OUTTYPES)}")
    script = find_converter(converter)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    path = resolve_model(model)
    with tempfile.TemporaryDirectory(prefix="calltune-export-") as tmp:
        # the converter reads a local folder of full weights: merge an adapter, save a hub model
        local = Path(path).is_dir() and not is_adapter(path)
        source = Path(path) if local else Path(export_hf(path, Path(tmp) / "merged"))
        _check_chat_template(source)
        cmd = [sys.executable, str(script), str(source), "--outfile", str(output), "--outtype", outtype]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_converter_env(script))
    if done.returncode != 0 or not output.exists():
        raise _failure(cmd, done, script)
    return output
