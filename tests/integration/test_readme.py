"""The README's shell commands, as written: every ``bash`` block's command is either
parsed and run here, or skipped by name below with its reason, so the README cannot
drift from the code.

1. Every ``pdserve ...`` and ``python -m deploy.ray.job ...`` line parses with the real
   argument parser (a renamed flag fails here).
2. The quick-start client commands (``pdserve generate``, ``curl``) run as written
   against ``pdserve up --launcher process``, itself the README's command, started in
   the background, health-waited, then stopped with Ctrl-C (SIGINT) as the README says.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent

SERVE = ".venv/bin/pdserve up --launcher process"
"""Run in the background: the cluster the client commands talk to."""
RUN = (
    '.venv/bin/pdserve generate "What is the capital of France?" --chat',
    '.venv/bin/pdserve generate "What is the capital of France?" --chat --max-tokens 64',
    "curl -s http://127.0.0.1:8000/v1/models",
    "curl -s http://127.0.0.1:8000/v1/chat/completions",
    "curl -sN http://127.0.0.1:8000/v1/completions",
    ".venv/bin/pdserve --version",
)
"""Run as written once SERVE answers (matched by the start of the command)."""
SKIP = {
    "make run": "installs, then serves in the foreground on Ray: SERVE is the same cluster "
                "without Ray; tests/integration/test_ray_up.py runs pdserve up on Ray",
    "make test": "the whole suite, this test included",
    ".venv/bin/pdserve up": "a second cluster on the same ports as SERVE (parsed above); "
                            "Ray: tests/integration/test_ray_up.py",
    "pdserve up": "a cluster in the foreground (parsed above); test_ray_up.py runs it on Ray",
    ".venv/bin/pdserve generate \"Hello\" --api-key": "needs a router started with that key "
                                                      "(tests/unit/test_front_door_units.py)",
    ".venv/bin/pdserve generate \"Hello\" --offline": "loads the model in-process (~20 s "
                                                      "here); tests/unit cover the engine",
    ".venv/bin/pdserve certs": "writes ./pki into the working tree; tests/unit/test_tls.py and "
                               "test_tls_cluster.py run it into a temporary directory",
    ".venv/bin/pdserve generate \"Hello\" --tls-ca": "needs a cluster up with --certs "
                                                      "(tests/integration/test_tls_cluster.py)",
    ".venv/bin/pdserve chat": "interactive; tests/integration/test_chat_cli.py drives "
                              "chat --address through a pty",
    ".venv/bin/pdserve bench": "minutes of benchmarking, or placeholder file names",
    "pdserve bench": "minutes of benchmarking against the cluster",
    "pdserve generate": "talks to a cluster on a Ray head (HEAD_IP) or started by ray job",
    "python -m prefill_worker --device cuda": "needs a CUDA GPU (tests/gpu run the GPU "
                                              "prefill worker where one is)",
    "python -m decode_worker --device cpu --port 50071 --prefill-allowlist GPU_HOST":
        "dials a prefill worker on another machine (GPU_HOST is a placeholder)",
    "bash bench/gpu_check.sh": "needs a CUDA GPU: the gpu tests and bench/gpu_check.py",
    "grep Cpus_allowed_list": "<pid> is a placeholder (pinning: test_ray_up.py)",
    "source .venv/bin/activate": "shell set-up",
    "export RAY_AUTH_MODE": "shell set-up",
    "ray ": "a Ray head on the default ports; `ray stop` stops every Ray instance on the "
            "machine (test_ray_job.py submits the job to a private head)",
    "serve run": "Ray Serve on a Ray head (tests/integration/test_ray_serve.py)",
    "python3 -m venv /work/vllm-venv": "installs vLLM (a separate venv, minutes, network)",
    "/work/vllm-venv/bin/pip": "installs vLLM (network)",
    "DURATION=180": "~35 minutes of benchmarking on a quiet machine",
    "docker ": "needs Docker (tests/deploy/test_dockerfile.py checks the Dockerfile)",
    "kind ": "needs kind and Docker",
    "kubectl": "needs a Kubernetes cluster (tests/deploy renders and validates every "
               "manifest)",
}
PORTS = (50051, 8000, 50061, 50071, 9061, 9071)  # the defaults the client commands assume
SEPARATORS = {"&&", "||", ";", "|", "&"}


def bash_commands(text: str) -> list[str]:
    """Every command of every ```bash block: continuation lines joined, a quote that
    spans lines kept whole, comment-only lines dropped."""
    out: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        buf = ""
        for line in block.splitlines():
            buf = f"{buf}\n{line}" if buf else line
            if buf.rstrip().endswith("\\") or not _complete(buf):
                continue
            if _words(buf):
                out.append(buf)
            buf = ""
    return out


def _words(cmd: str) -> list[str]:
    return shlex.split(re.sub(r"\\\n", " ", cmd), comments=True)  # as bash joins lines


def _complete(cmd: str) -> bool:
    try:
        _words(cmd)
    except ValueError:  # an open quote: the command goes on on the next line
        return False
    return True


def simple_commands(cmd: str) -> Iterator[list[str]]:
    """The argv of each simple command of a line (env assignments dropped)."""
    argv: list[str] = []
    for tok in [*_words(cmd), ";"]:
        if tok in SEPARATORS:
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                argv.pop(0)
            if argv:
                yield argv
            argv = []
        else:
            argv.append(tok)


def _parseable(cmd: str) -> Iterator[tuple[str, list[str]]]:
    for argv in simple_commands(cmd):
        if Path(argv[0]).name == "pdserve":
            yield "pdserve", argv[1:]
        elif "--" in argv and argv[argv.index("--") + 1:][:3] == ["python", "-m",
                                                                  "deploy.ray.job"]:
            yield "job", argv[argv.index("--") + 4:]


COMMANDS = bash_commands(README.read_text())
PARSED = [(f"{kind}: {' '.join(argv)}", kind, argv)
          for cmd in COMMANDS for kind, argv in _parseable(cmd)]


def _name(cmd: str) -> str:
    return " ".join(re.sub(r"\\\n", " ", cmd).split())


def _matches(cmd: str, prefixes: tuple[str, ...] | list[str]) -> str | None:
    return next((p for p in prefixes if _name(cmd).startswith(_name(p))), None)


def test_every_readme_command_is_run_or_skipped_by_name() -> None:
    assert len(PARSED) >= 10 and len(COMMANDS) >= 30  # the extraction found the blocks
    for cmd in COMMANDS:
        if cmd == SERVE or _matches(cmd, RUN):
            continue
        assert _matches(cmd, list(SKIP)), (
            f"README command not covered: {cmd!r}: run it in RUN or skip it by name in SKIP "
            "with the reason")
    for wanted in (SERVE, *RUN, *SKIP):  # no stale entry: each names a README command
        assert any(_matches(c, [wanted]) for c in COMMANDS), f"no longer in README: {wanted}"


@pytest.mark.parametrize(("kind", "argv"), [(k, a) for _, k, a in PARSED],
                         ids=[name for name, _, _ in PARSED])
def test_readme_command_parses(kind: str, argv: list[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # relative paths (deploy/ray/cluster.yaml) as in the README
    if kind == "pdserve":
        from pdserve import cli

        monkeypatch.setattr(cli, "_dispatch", lambda args: 0)  # parse only, run nothing
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # --version and --help exit 0; a bad flag exits 2
            rc = int(e.code or 0)
    else:
        from deploy.ray import job

        monkeypatch.setattr(job, "up", lambda config: 0)  # the config is read, not run
        monkeypatch.setattr(job.logs, "configure", lambda role: None)
        try:
            rc = job.main(argv)
        except SystemExit as e:
            rc = int(e.code or 0)
    assert rc == 0, f"{kind} {' '.join(argv)} no longer parses"


def _as_written(cmd: str) -> str:
    """The command for bash, with the README's .venv meaning this interpreter's venv."""
    return cmd.replace(".venv/bin/", f"{VENV_BIN}/")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}
    return {**env, "PATH": f"{VENV_BIN}:{env.get('PATH', '')}", "PYTHONPATH": str(REPO)}


def _busy(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _healthy(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{SERVE} exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"not healthy: {log.read_text()[-3000:]}"
        time.sleep(0.5)


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Path]:
    taken = [p for p in PORTS if _busy(p)]
    if taken:
        pytest.skip(f"ports {taken} are in use: the README's client commands assume them")
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(["bash", "-c", "exec " + _as_written(SERVE)], cwd=REPO,
                                env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _healthy(proc, log, timeout=240)
        yield log
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C, as the README stops it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode in (0, -signal.SIGINT, 130), log.read_text()[-3000:]


def _run(cmd: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    return cmd, subprocess.run(["bash", "-c", _as_written(cmd)], cwd=REPO, env=_env(),
                               capture_output=True, text=True, timeout=180)


def _check_output(cmd: str, out: str) -> None:
    assert out.strip(), f"{cmd}: no output"
    if cmd.startswith("curl") and out.lstrip().startswith("{"):
        body = json.loads(out)
        assert "error" not in body and ("data" in body or body["choices"]), body
    if "stream" in cmd:
        assert out.rstrip().endswith("data: [DONE]"), out[-300:]


def test_quick_start_commands_run_as_written(served: Path) -> None:
    commands = [c for c in COMMANDS if _matches(c, RUN)]
    assert len(commands) >= len(RUN)
    with ThreadPoolExecutor(4) as pool:  # independent clients: the cluster batches them
        results = list(pool.map(_run, commands))
    for cmd, res in results:
        assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
        _check_output(cmd, res.stdout)
    assert "logs       every role logs to this terminal's stderr" in served.read_text()
