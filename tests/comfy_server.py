"""A real ComfyUI, headless on the CPU, with flowtuner's node pack installed by `flowtuner comfyui install`.

The `comfy_server` fixture (session scope) starts the vendored ComfyUI (../shared/vendor) once:
- its own base directory in a temp folder (--base-directory: custom_nodes/, models/, input/, user/), so the
  extracted vendor tree shared by the in-process tests is never modified;
- the pack installed there by the CLI (`flowtuner comfyui install --comfyui_dir BASE --python <this Python>`);
- no web frontend: `--front-end-root` points at a one-page folder, so the comfyui-frontend-package wheel is not
  needed (the API under test is the server's);
- a test-only custom node (tests/comfy_depth_node.py, no nodes) that makes CLIPLoader build only the text-encoder
  layers a file holds, for the real-width few-layer files of tests/test_comfyui_native.py;
- launched through this file (`python tests/comfy_server.py COMFYUI_DIR [--fail-module NAME] -- ARGS`), which
  puts the torchvision / torchaudio stand-ins in place (tests/shared.py) and then runs ComfyUI's main.py.

API: `.url`, `.base`, `.models` (models/ with diffusion_models/, text_encoders/, vae/, loras/, ...),
`.output_dir`, `.input_dir`, `.log()` (the server's stdout+stderr so far), `.object_info()`,
`.run(workflow, timeout=120, client_id=...)` -> the /history entry (raises `ComfyRunError` with ComfyUI's error text).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120  # ComfyUI imports torch, transformers and all of comfy_extras: ~20-40 s on 2 busy cores
MODEL_FOLDERS = ("diffusion_models", "unet", "text_encoders", "clip", "vae", "loras", "checkpoints", "diffusers")


class ComfyRunError(RuntimeError):
    """A workflow ComfyUI refused or failed; str() is ComfyUI's error text, `.entry` the raw answer."""

    def __init__(self, message: str, entry: dict | None = None):
        super().__init__(message)
        self.message = message
        self.entry = entry or {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_root: Path, base: Path, fail_module: str | None = None, edit_vae_area: int | None = None):
        self.comfy_root = Path(comfy_root)
        self.base = Path(base)
        self.models = self.base / "models"
        self.output_dir = self.base / "output"
        self.input_dir = self.base / "input"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.fail_module = fail_module
        # edit models' reference-image area in the server process, as tests' small_area fixture sets it in-process
        # (the real ~1 MP VAE encode of a tiny model costs seconds per run on a CPU)
        self.edit_vae_area = edit_vae_area
        self.process: subprocess.Popen | None = None
        self.start_seconds = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        for name in MODEL_FOLDERS:
            (self.models / name).mkdir(parents=True, exist_ok=True)
        for folder in (self.output_dir, self.input_dir, self.base / "custom_nodes", self.base / "frontend"):
            folder.mkdir(parents=True, exist_ok=True)
        (self.base / "frontend" / "index.html").write_text("<html><body>flowtuner test server (no frontend)</body></html>")
        # test-only, registers no node: CLIPLoader builds only the layers a file holds (tests/comfy_depth_node.py)
        shutil.copy(REPO / "tests" / "comfy_depth_node.py", self.base / "custom_nodes" / "flowtuner_test_depth.py")
        done = subprocess.run([sys.executable, "-m", "flowtuner", "comfyui", "install", "--comfyui_dir", str(self.base),
                               "--python", sys.executable], capture_output=True, text=True, env=self.env(), cwd=REPO)
        if done.returncode != 0:
            raise RuntimeError(f"flowtuner comfyui install failed: {done.stderr.strip() or done.stdout.strip()}")

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("OMP_NUM_THREADS", "1")
        env["HF_HUB_OFFLINE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def command(self) -> list[str]:
        launcher = [sys.executable, str(Path(__file__).resolve()), str(self.comfy_root)]
        if self.fail_module:
            launcher += ["--fail-module", self.fail_module]
        if self.edit_vae_area:
            launcher += ["--edit-vae-area", str(self.edit_vae_area)]
        return launcher + ["--", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
                           "--base-directory", str(self.base), "--output-directory", str(self.output_dir),
                           "--input-directory", str(self.input_dir), "--front-end-root", str(self.base / "frontend"),
                           "--database-url", "sqlite:///:memory:", "--log-stdout"]

    def start(self, timeout: float = START_TIMEOUT_S) -> "ComfyServer":
        self.prepare()
        began = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                            cwd=self.base)
        while time.monotonic() - began < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} while starting:\n{self.log()[-4000:]}")
            try:
                self.get("/object_info/PrimitiveInt")
                self.start_seconds = time.monotonic() - began
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP ------------------------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict, timeout: float = 30):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # ComfyUI answers 400 with a JSON body for invalid prompts
            body = exc.read()
            try:
                answer = json.loads(body)
            except ValueError:
                raise ComfyRunError(f"HTTP {exc.code}: {body[:500]!r}") from None
            raise ComfyRunError(validation_text(answer), answer) from None

    def object_info(self, node: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node}" if node else ""))

    def run(self, workflow: dict, timeout: float = 120, client_id: str = "flowtuner-tests") -> dict:
        """Queue an API-format workflow, wait for it, return its /history entry (outputs, status). ComfyUI sends
        a prompt's websocket messages (progress, ...) to the client that queued it: `client_id`."""
        prompt_id = str(uuid.uuid4())
        self.post("/prompt", {"prompt": workflow, "client_id": client_id, "prompt_id": prompt_id})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running a workflow:\n{self.log()[-4000:]}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"]["completed"] or entry["status"].get("status_str") == "error"):
                if entry["status"].get("status_str") == "error":
                    raise ComfyRunError(execution_text(entry), entry)
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"workflow {prompt_id} not done within {timeout} s:\n{self.log()[-3000:]}")


def execution_text(entry: dict) -> str:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return str(data.get("exception_message", "")).strip()
    return f"failed without an execution_error message: {entry.get('status')}"


def validation_text(answer: dict) -> str:
    lines = [answer.get("error", {}).get("message", "")] if isinstance(answer.get("error"), dict) else [str(answer.get("error"))]
    for node_id, info in (answer.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            lines.append(f"node {node_id} ({info.get('class_type')}): {err.get('message')}: {err.get('details')}")
    return "\n".join(line for line in lines if line)


def start_server(tmp_dir: Path, fail_module: str | None = None, edit_vae_area: int | None = None) -> ComfyServer:
    from tests.shared import _extract

    return ComfyServer(_extract("comfyui"), tmp_dir, fail_module=fail_module, edit_vae_area=edit_vae_area).start()


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory):
    """A running headless ComfyUI with the pack installed (skipped without ../shared; fails in CI)."""
    from tests.test_edit_dit import SMALL_AREA

    server = start_server(tmp_path_factory.mktemp("comfyui-base"), edit_vae_area=SMALL_AREA)
    try:
        yield server
    finally:
        server.stop()


# -- launcher: runs in the server's own process ------------------------------------------------------------------

def _die_with_parent() -> None:
    """Linux: the server ends when the test process does, even when that one is killed and its fixtures never stop
    the server (an orphaned server was seen holding 0.6 GB after a timed-out run)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the line above
        sys.exit(1)


def _launch(argv: list[str]) -> None:
    import runpy

    sep = argv.index("--")
    own, comfy_args = argv[:sep], argv[sep + 1:]
    _die_with_parent()
    comfy_root = Path(own[0])
    if "--fail-module" in own:  # a test-only way to make one of the pack's node modules fail at import
        sys.modules[f"flowtuner.comfyui.{own[own.index('--fail-module') + 1]}"] = None
    if "--edit-vae-area" in own:
        from flowtuner.families.qwen_image import edit_sizes

        edit_sizes.VAE_AREA = int(own[own.index("--edit-vae-area") + 1])
    sys.path.insert(0, str(REPO))
    from tests.shared import _stub_missing_media_packages

    _stub_missing_media_packages()
    sys.path.insert(0, str(comfy_root))
    sys.argv = [str(comfy_root / "main.py"), *comfy_args]
    runpy.run_path(str(comfy_root / "main.py"), run_name="__main__")


if __name__ == "__main__":
    _launch(sys.argv[1:])
