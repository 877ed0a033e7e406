"""llama.cpp's Jinja engine (``common/jinja``: what ``llama-server --jinja`` renders chat templates with),
built for the template tests from the llama-cpp-python source distribution that calltune's GGUF export
pins (`calltune.serve.export.LLAMA_CPP_PYTHON`).

`renderer` downloads that sdist once with pip (~75 MB), compiles the engine's sources with the small
driver ``native/llama_jinja_render.cpp`` (g++, C++17) and caches the program under
``$CALLTUNE_HOME/llama.cpp/jinja-render-VERSION-DRIVERHASH/``; `render` runs it on many contexts at once,
`capabilities` reports what llama-server's capability probe (``jinja::caps_get``) finds in a template.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
import json
from pathlib import Path

from calltune.models import calltune_home
from calltune.serve.export import LLAMA_CPP_PYTHON

DRIVER = Path(__file__).parent / "native" / "llama_jinja_render.cpp"
# What the engine and the driver compile from, under the sdist's vendor/llama.cpp/.
SOURCES = ["common/jinja/lexer.cpp", "common/jinja/parser.cpp", "common/jinja/runtime.cpp",
           "common/jinja/string.cpp", "common/jinja/value.cpp", "common/jinja/caps.cpp", "common/json.cpp",
           "common/unicode.cpp"]
HEADERS = ["common/jinja/", "common/json.h", "common/unicode.h", "vendor/nlohmann/", "ggml/include/"]


def renderer(version: str = LLAMA_CPP_PYTHON) -> Path:
    """The compiled renderer for llama-cpp-python `version`, built on first use.

    Raises:
        RuntimeError: pip could not fetch the sdist, or g++ could not build it (the message has the tail
            of their output).
    """
    driver = hashlib.sha256(DRIVER.read_bytes()).hexdigest()[:10]
    target = calltune_home() / "llama.cpp" / f"jinja-render-{version}-{driver}"
    program = target / "render"
    if program.is_file():
        return program
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".jinja-render-", dir=target) as tmp:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               "--dest", tmp, f"llama-cpp-python=={version}"], capture_output=True, text=True)
        sdists = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise RuntimeError(f"pip download llama-cpp-python=={version} failed:\n{done.stderr[-2000:]}")
        root = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdists[0], "r:gz") as tar:
            wanted = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(root)
                      and any(m.name[len(root):].startswith(p) for p in SOURCES + HEADERS)]
            tar.extractall(tmp, members=wanted, filter="data")
        src = Path(tmp) / root
        built = Path(tmp) / "render"
        cmd = ["g++", "-std=c++17", "-O1", "-w", f"-I{src / 'common'}", f"-I{src / 'vendor'}",
               f"-I{src / 'ggml' / 'include'}", str(DRIVER), *[str(src / s) for s in SOURCES], "-o", str(built)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building llama.cpp's Jinja engine failed ({' '.join(cmd[:6])} ...):\n"
                               f"{done.stderr[-3000:]}")
        built.replace(program)
    return program


def _run(template: str, contexts: list[dict]) -> tuple[dict, list[str | RuntimeError]]:
    done = subprocess.run([str(renderer())], input=json.dumps({"template": template, "contexts": contexts}).encode(),
                          capture_output=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode(errors="replace").strip())
    out, at = [], 0
    data = done.stdout
    while at < len(data):
        line_end = data.index(b"\n", at)
        status, size = data[at:line_end].decode().split()
        body = data[line_end + 1:line_end + 1 + int(size)].decode()
        out.append(body if status == "OK" else RuntimeError(body))
        at = line_end + 1 + int(size)
    if len(out) != len(contexts) + 1:
        raise RuntimeError(f"the renderer answered {len(out) - 1} of {len(contexts)} contexts: {done.stderr[-500:]!r}")
    return json.loads(out[0]), out[1:]


def render(template: str, contexts: list[dict]) -> list[str | RuntimeError]:
    """`template` rendered by llama.cpp's engine with each of `contexts` (the template's variables): the
    text, or a RuntimeError with the engine's message where rendering raised.

    Raises:
        RuntimeError: the template does not parse.
    """
    return _run(template, contexts)[1]


def capabilities(template: str) -> dict[str, bool]:
    """What llama-server's probe finds `template` supports (``supports_tools``, ``supports_tool_calls``,
    ``supports_system_role``, ``supports_object_arguments``, ...): it decides how llama-server reshapes
    messages before rendering (``common/chat.cpp``), e.g. parsing string call arguments into objects.

    Raises:
        RuntimeError: the template does not parse.
    """
    return _run(template, [])[0]
