"""llama.cpp's chat code, built for the template tests from the llama-cpp-python source distribution that
calltune's GGUF export pins (`calltune.serve.export.LLAMA_CPP_PYTHON`): two small programs,

- ``render`` (driver ``native/llama_jinja_render.cpp``): llama.cpp's Jinja engine (``common/jinja``, what
  ``llama-server --jinja`` renders chat templates with) on a template and raw variables, plus the
  capability probe llama-server runs on a template (``jinja::caps_get``);
- ``server_chat`` (driver ``native/llama_server_chat.cpp``): llama-server's own chat code
  (``common/chat.cpp``) on OpenAI requests: the prompt it builds (with the message reshaping the probe
  decides) and the parse of a model output into content and tool calls, with the parser llama-server
  derives from the template.

`programs` downloads the sdist once with pip (`calltune.serve.export.download_sdist`), compiles with g++
(C++17, two compilers at a time, ~2 min) and caches both under
``$CALLTUNE_HOME/llama.cpp/chat-VERSION-DRIVERSHASH/``. libllama is not linked: with the template given and
no model, the chat code reaches none of it (``server_chat`` aborts if it ever does).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from calltune.models import calltune_home
from calltune.serve.export import LLAMA_CPP_PYTHON, download_sdist

NATIVE = Path(__file__).parent / "native"
DRIVERS = {"render": NATIVE / "llama_jinja_render.cpp", "server_chat": NATIVE / "llama_server_chat.cpp"}
# What the programs compile from, under the sdist's vendor/llama.cpp/ (the jinja engine and json for both).
JINJA = ["common/jinja/lexer.cpp", "common/jinja/parser.cpp", "common/jinja/runtime.cpp", "common/jinja/string.cpp",
         "common/jinja/value.cpp", "common/jinja/caps.cpp", "common/json.cpp", "common/unicode.cpp"]
CHAT = ["common/chat.cpp", "common/chat-auto-parser-generator.cpp", "common/chat-auto-parser-helpers.cpp",
        "common/chat-diff-analyzer.cpp", "common/chat-peg-parser.cpp", "common/peg-parser.cpp", "common/trie.cpp",
        "common/json-schema.cpp", "common/json-schema-to-grammar.cpp", "common/log.cpp", "common/common.cpp"]
EXTRACT = ["common/", "include/", "ggml/include/", "vendor/"]


def programs(version: str = LLAMA_CPP_PYTHON) -> dict[str, Path]:
    """The compiled ``render`` and ``server_chat`` for llama-cpp-python `version`, built on first use.

    Raises:
        RuntimeError: pip could not fetch the sdist, or g++ could not build it (the message has the tail
            of their output).
    """
    drivers = hashlib.sha256(b"".join(p.read_bytes() for p in DRIVERS.values())).hexdigest()[:10]
    target = calltune_home() / "llama.cpp" / f"chat-{version}-{drivers}"
    built = {name: target / name for name in DRIVERS}
    if all(p.is_file() for p in built.values()):
        return built
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=target) as tmp:
        try:
            sdist = download_sdist(version, Path(tmp))
        except FileNotFoundError as err:
            raise RuntimeError(str(err)) from None
        root = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist, "r:gz") as tar:
            wanted = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(root)
                      and any(m.name[len(root):].startswith(p) for p in EXTRACT)]
            tar.extractall(tmp, members=wanted, filter="data")
        src = Path(tmp) / root
        parsers = sorted(str(p.relative_to(src)) for p in (src / "common" / "parsers").glob("*.cpp"))
        flags = ["g++", "-std=c++17", "-O1", "-w", "-ffunction-sections", "-fdata-sections", f"-I{src / 'common'}",
                 f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}", f"-I{src / 'vendor'}"]

        def compile_one(source: Path) -> Path:
            obj = Path(tmp) / (str(source.relative_to(source.anchor)).replace("/", "_") + ".o")
            done = subprocess.run([*flags, "-c", str(source), "-o", str(obj)], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"building llama.cpp's chat code failed on {source.name}:\n{done.stderr[-3000:]}")
            return obj

        sources = [src / s for s in JINJA + CHAT + parsers] + list(DRIVERS.values())
        with ThreadPoolExecutor(2) as pool:
            objects = dict(zip(sources, pool.map(compile_one, sources)))
        jinja = [objects[src / s] for s in JINJA]
        chat = [objects[src / s] for s in CHAT + parsers]
        links = {"render": [objects[DRIVERS["render"]], *jinja],
                 "server_chat": [objects[DRIVERS["server_chat"]], *jinja, *chat]}
        for name, objs in links.items():
            out = Path(tmp) / name
            done = subprocess.run(["g++", *map(str, objs), "-o", str(out), "-lpthread", "-Wl,--gc-sections"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"linking {name} failed:\n{done.stderr[-3000:]}")
            out.replace(built[name])
    return built


def _answers(data: bytes) -> list[str | RuntimeError]:
    """A program's records ("OK n" / "ERR n" and n bytes each), in order."""
    out, at = [], 0
    while at < len(data):
        line_end = data.index(b"\n", at)
        status, size = data[at:line_end].decode().split()
        body = data[line_end + 1:line_end + 1 + int(size)].decode()
        out.append(body if status == "OK" else RuntimeError(body))
        at = line_end + 1 + int(size)
    return out


def _run(program: str, requests: list[dict]) -> list[list[str | RuntimeError]]:
    """`program`'s answers to each of `requests`, one process per request, all running at once."""
    procs = [subprocess.Popen([str(programs()[program])], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in requests]
    with ThreadPoolExecutor(len(procs)) as pool:
        outs = list(pool.map(lambda pr: pr[0].communicate(json.dumps(pr[1]).encode()), zip(procs, requests)))
    for proc, (_, err) in zip(procs, outs):
        if proc.returncode != 0:
            raise RuntimeError(err.decode(errors="replace").strip())
    return [_answers(out) for out, _ in outs]


def render(template: str, contexts: list[dict]) -> list[str | RuntimeError]:
    """`template` rendered by llama.cpp's engine with each of `contexts` (the template's variables): the
    text, or a RuntimeError with the engine's message where rendering raised.

    Raises:
        RuntimeError: the template does not parse.
    """
    out = _run("render", [{"template": template, "contexts": contexts}])[0]
    if len(out) != len(contexts) + 1:
        raise RuntimeError(f"the renderer answered {len(out) - 1} of {len(contexts)} contexts")
    return out[1:]


def capabilities(template: str) -> dict[str, bool]:
    """What llama-server's probe finds `template` supports (``supports_tools``, ``supports_tool_calls``,
    ``supports_system_role``, ``supports_object_arguments``, ...): it decides how llama-server reshapes
    messages before rendering (``common/chat.cpp``), e.g. parsing string call arguments into objects.

    Raises:
        RuntimeError: the template does not parse.
    """
    return json.loads(_run("render", [{"template": template, "contexts": []}])[0][0])


def server_chat(template: str, bos_token: str, eos_token: str, requests: list[dict]) -> list[dict | RuntimeError]:
    """llama-server's handling of each of `requests` (``messages``, ``tools``, ``add_generation_prompt``,
    ``parallel_tool_calls`` as in an OpenAI request, and optionally ``output``: a model's generated text)
    under `template`: ``{"prompt", "format", "message"}`` (``message``: the output parsed into an OpenAI
    assistant message with ``content`` and ``tool_calls``), or a RuntimeError with llama.cpp's message.

    Raises:
        RuntimeError: the template does not load.
    """
    # the chat code renders the template several times per request: two processes share the work
    half = (len(requests) + 1) // 2
    parts = [requests[:half], requests[half:]] if len(requests) > 1 else [requests]
    out = [answer for answers in _run("server_chat", [{"template": template, "bos_token": bos_token,
                                                        "eos_token": eos_token, "requests": part} for part in parts])
           for answer in answers]
    if len(out) != len(requests):
        raise RuntimeError(f"llama-server's chat code answered {len(out)} of {len(requests)} requests")
    return [r if isinstance(r, RuntimeError) else json.loads(r) for r in out]
