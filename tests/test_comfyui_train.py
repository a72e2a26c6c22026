"""The training node (flowtuner.comfyui.train): an image folder -> a LoRA in ComfyUI's loras folder, by
`flowtuner cache-latents`, `cache-text` and `train` in child processes.

Fast, in-process: the pure parts (LoRA names, extra flags, the dataset config, the command lines, the child's error
line), `flowtuner train --progress_file`, and the child runner on real child processes (a failing flowtuner
command, ComfyUI's interrupt with a child that ignores SIGTERM, an exception while waiting).
Slow, over HTTP with the headless ComfyUI (tests/comfy_server.py): the node's LoRA equals `flowtuner train`'s with
the same data and settings and its progress reaches the total on ComfyUI's websocket; bad inputs are one line with
no file in loras/; POST /interrupt ends a long run quickly with no LoRA and no child process left.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowtuner.cli import main
from flowtuner.errors import ConfigError
from tests.datasets import noise_image, write_item


def images_folder(root: Path, count: int = 2, missing_caption: bool = False) -> Path:
    folder = root / "images"
    for i in range(count):
        write_item(folder, f"img{i}", noise_image(64, 64, i), None if missing_caption and i == 1 else f"caption number {i}")
    return folder


# -- pure parts ------------------------------------------------------------------------------------------------


def test_lora_names():
    from flowtuner.comfyui.train import lora_relative

    assert str(lora_relative("my_style")) == "my_style.safetensors"
    assert str(lora_relative(" sub\\my_style.safetensors ")) == "sub/my_style.safetensors"
    for bad in ("", "  ", "/abs/x", "../up", "a/../b", "C:x", "a//b"):
        with pytest.raises(ConfigError, match="give a file name"):
            lora_relative(bad)


def test_extra_flags_checked_before_anything_runs():
    from flowtuner.comfyui.train import flag_value, parse_extra_flags

    tokens = parse_extra_flags("--mixed_precision bf16 --gradient-checkpointing  # a comment\n--network_args 'verbose=True'")
    assert tokens == ["--mixed_precision", "bf16", "--gradient-checkpointing", "--network_args", "verbose=True"]
    assert parse_extra_flags("  ") == []
    assert flag_value(["--device", "cuda:1", "--device=cpu"], "--device") == "cpu"
    assert flag_value(["--seed", "1"], "--device") is None
    cases = {
        "--learning_rate 1e-3": "--learning_rate is set by the learning_rate widget",
        "--learning-rate=1e-3": "--learning_rate is set by the learning_rate widget",
        "--output_dir x": "--output_dir is set by the lora_name widget",
        "--edit_plus": "--edit_plus is set by the model_version widget",
        "--no_such_flag 3": "--no_such_flag 3: not a flowtuner train flag",
        "--mixed_precision fp64": "invalid choice: 'fp64'",
        "--network_dim four": "invalid int value",
        "--sample_prompts 'unclosed": "No closing quotation",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError) as err:
            parse_extra_flags(text)
        assert message in str(err.value) and "\n" not in str(err.value), (text, str(err.value))


def test_dataset_config_reads_back(tmp_path):
    from flowtuner.comfyui.train import dataset_toml
    from flowtuner.data.config import load_dataset_config

    odd = tmp_path / 'a "quoted" \\ folder ü'
    odd.mkdir()
    config = tmp_path / "dataset.toml"
    config.write_text(dataset_toml(odd, tmp_path / "cache", 512, control=odd), encoding="utf-8")
    [ds] = load_dataset_config(config)
    assert ds.image_directory == odd and ds.cache_directory == tmp_path / "cache" and ds.control_directory == odd
    assert ds.resolution == (512, 512) and ds.batch_size == 1 and ds.enable_bucket and ds.caption_extension == ".txt"


def test_command_lines(tmp_path):
    from flowtuner.comfyui.train import Job, commands

    job = Job(tmp_path, Path("/m/dit.safetensors"), Path("/m/te.safetensors"), Path("/m/vae.safetensors"), "edit-2509",
              Path("/comfy"), "cuda:0", 250, 5e-5, 8, 4.0, 7, ["--mixed_precision", "bf16"])
    (latents, a), (text, b), (train, c) = commands(job)
    assert (latents, text, train) == ("cache-latents", "cache-text", "train")
    common = ["--dataset_config", str(tmp_path / "dataset.toml"), "--model_version", "edit-2509", "--comfyui_dir", "/comfy"]
    assert a == [*common, "--vae", "/m/vae.safetensors", "--device", "cuda:0"]
    assert b == [*common, "--text_encoder", "/m/te.safetensors", "--device", "cuda:0"]
    assert c == [*common, "--dit", "/m/dit.safetensors", "--vae", "/m/vae.safetensors", "--text_encoder",
                 "/m/te.safetensors", "--device", "cuda:0", "--output_dir", str(tmp_path / "train"), "--output_name",
                 "lora", "--max_train_steps", "250", "--learning_rate", "5e-05", "--network_dim", "8", "--network_alpha",
                 "4.0", "--seed", "7", "--progress_file", str(tmp_path / "progress.jsonl"), "--mixed_precision", "bf16"]
    from flowtuner.comfyui.train import _train_parser

    args, unknown = _train_parser().parse_known_args(c)  # what the child will parse
    assert not unknown and args.learning_rate == 5e-5 and args.network_alpha == 4.0 and args.mixed_precision == "bf16"


def test_child_error_lines():
    from flowtuner.comfyui.train import child_error

    tqdm = "training:  50%|#####     | 1/2 [00:01<00:01]\r"
    assert child_error("train", 2, f"INFO: x\n{tqdm}flowtuner train: error: the loss became nan at step 3.\n") == \
        "flowtuner train: error: the loss became nan at step 3."
    summary = "text caches: 2 items: 0 cached, 2 failed\n  failed: /d/a.png: missing or empty caption\n  failed: /d/b.png: bad\n"
    assert child_error("cache-text", 1, summary) == \
        "flowtuner cache-text: error: /d/a.png: missing or empty caption (and 1 more, listed in ComfyUI's console)"
    assert child_error("train", -9, "step 1\n\n") == "flowtuner train was killed by signal 9 (out of memory?); its last line: step 1"
    assert "stopped with exit code 1" in child_error("train", 1, "Traceback ...\nRuntimeError: boom\n")
    chained = f"flowtuner: running cache-latents\n  failed: /d/x.png: an earlier line\nflowtuner: running cache-text\n{summary}"
    assert child_error("cache-latents + cache-text", 1, chained) == \
        "flowtuner cache-text: error: /d/a.png: missing or empty caption (and 1 more, listed in ComfyUI's console)"
    assert child_error("cache-latents + cache-text", -9, "flowtuner: running cache-text\nloading\n") == \
        "flowtuner cache-text was killed by signal 9 (out of memory?); its last line: loading"


def test_chain_runs_commands_in_order_and_stops_at_the_first_failure(capsys):
    from flowtuner.cli.chain import run

    ok = ["sigmas", "--steps", "2", "--model_version", "original"]
    assert run([ok, ok]) == 0
    assert capsys.readouterr().err.count("flowtuner: running sigmas") == 2
    assert run([ok, ["sigmas", "--steps", "-3"], ok]) == 2
    err = capsys.readouterr().err
    assert err.count("flowtuner: running sigmas") == 2 and "flowtuner sigmas: error:" in err


def test_progress_file_partial_lines(tmp_path):
    from flowtuner.train.progress import ProgressFile, read_progress

    path = tmp_path / "p.jsonl"
    progress = ProgressFile(str(path), total=3)
    progress.step(1, 0.5, 0.5, 1e-4)
    records, offset = read_progress(path)
    assert records == [{"step": 0, "total": 3}, {"step": 1, "total": 3, "loss": 0.5, "avg_loss": 0.5, "lr": 1e-4}]
    with open(path, "a") as f:
        f.write('{"step": 2, "tot')  # a line being written is not read yet
    assert read_progress(path, offset) == ([], offset)
    assert read_progress(tmp_path / "none.jsonl") == ([], 0)
    progress.close()
    assert ProgressFile(None, 3).file is None and ProgressFile(str(path), 3, enabled=False).file is None


def test_train_writes_its_progress_file(tiny_files, tmp_path):
    """`flowtuner train --progress_file`: a start line, then one line per step with that step's loss, the running mean
    the progress bar shows and the learning rate."""
    from flowtuner.comfyui.train import dataset_toml
    from flowtuner.train.progress import read_progress

    config = tmp_path / "dataset.toml"
    config.write_text(dataset_toml(images_folder(tmp_path), tmp_path / "cache", 64))
    data = ["--dataset_config", str(config), "--model", str(tiny_files["repo"]), "--device", "cpu"]
    assert main(["cache-latents", *data]) == 0 and main(["cache-text", *data]) == 0
    progress = tmp_path / "progress.jsonl"
    assert main(["train", *data, "--output_dir", str(tmp_path / "out"), "--max_train_steps", "3", "--seed", "1",
                 "--learning_rate", "3e-4", "--progress_file", str(progress)]) == 0
    records, _ = read_progress(progress)
    assert records[0] == {"step": 0, "total": 3} and [r["step"] for r in records] == [0, 1, 2, 3]
    losses = [r["loss"] for r in records[1:]]
    assert all(math.isfinite(x) and x > 0 for x in losses) and {r["lr"] for r in records[1:]} == {3e-4}
    for n, r in enumerate(records[1:], 1):
        assert r["total"] == 3 and r["avg_loss"] == pytest.approx(sum(losses[:n]) / n)


# -- the child runner on real child processes ----------------------------------------------------------------------


def new_children(before: set[int]) -> list:
    """This process's children that were not there before (other tests' servers may run beside)."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]


def children_now() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_a_failing_child_is_its_one_line(tmp_path):
    from flowtuner.comfyui.loaders import NodeError
    from flowtuner.comfyui.train import run_child

    with pytest.raises(NodeError) as err:  # argparse's error, after its usage lines: the cheapest real failure
        run_child("train", ["--dataset_config", str(tmp_path / "none.toml"), "--mixed_precision", "fp64"],
                  interrupted=lambda: False, echo=None)
    line = str(err.value)
    assert line.startswith("flowtuner train: error: argument --mixed_precision") and "\n" not in line, line


class _Watch:
    """An echo stream that notes when the child said it was ready (instead of sleeping in the test)."""

    def __init__(self):
        self.ready = threading.Event()
        self.text = ""

    def write(self, text):
        self.text += text
        if "ready" in self.text:
            self.ready.set()

    def flush(self):
        pass


STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('flowtuner stand-in ready', flush=True); time.sleep(120)")


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_interrupt_stops_the_child(ignores_sigterm):
    """ComfyUI's interrupt: terminate, and kill a child that ignores it after the bound; nothing left running."""
    from flowtuner.comfyui.train import Interrupted, run_child

    watch = _Watch()
    code = STUBBORN if ignores_sigterm else STUBBORN.replace("signal.signal(signal.SIGTERM, signal.SIG_IGN); ", "")
    before, start = children_now(), time.monotonic()
    with pytest.raises(Interrupted):
        run_child("train", [], interrupted=watch.ready.is_set, echo=watch, poll_s=0.05, kill_after_s=0.5,
                  argv=[sys.executable, "-c", code])
    assert time.monotonic() - start < 20 and "ready" in watch.text
    assert not new_children(before)


def test_an_error_while_waiting_stops_the_child():
    """ComfyUI's progress hook raises its interrupt exception from inside the wait: the child goes too."""
    from flowtuner.comfyui.train import run_child

    watch = _Watch()

    def poll():
        if watch.ready.is_set():
            raise KeyError("raised by the progress hook")

    before, start = children_now(), time.monotonic()
    with pytest.raises(KeyError):
        run_child("train", [], on_poll=poll, interrupted=lambda: False, echo=watch, poll_s=0.05, kill_after_s=5,
                  argv=[sys.executable, "-c", STUBBORN.replace("signal.signal(signal.SIGTERM, signal.SIG_IGN); ", "")])
    assert time.monotonic() - start < 20 and not new_children(before)  # stopped, not waited for (it sleeps 120 s)


# -- a real ComfyUI over HTTP ------------------------------------------------------------------------------------


class Websocket:
    """ComfyUI's websocket for one client id, read in a thread: the progress messages the UI would get."""

    def __init__(self, url: str):
        self.client_id, self.messages, self.arrived = f"flowtuner-train-{uuid.uuid4().hex[:8]}", [], threading.Condition()
        self.url = url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._read(),), daemon=True)
        self.thread.start()
        assert self.wait_for(lambda: self.messages, 30), "no websocket connection"

    async def _read(self):
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.url) as ws:
                self.ws = ws
                async for message in ws:
                    if message.type == aiohttp.WSMsgType.TEXT:  # ComfyUI greets a new client with a status message
                        with self.arrived:
                            self.messages.append(json.loads(message.data))
                            self.arrived.notify_all()

    def wait_for(self, predicate, timeout: float) -> bool:
        with self.arrived:
            return self.arrived.wait_for(predicate, timeout)

    def progress(self, node: str) -> list[tuple[int, int]]:
        return [(m["data"]["value"], m["data"]["max"]) for m in list(self.messages)
                if m.get("type") == "progress" and m["data"].get("node") == node]

    def close(self):
        asyncio.run_coroutine_threadsafe(self.ws.close(), self.loop).result(10)
        self.thread.join(10)


@pytest.fixture
def server_models(comfy_server, tiny_files):
    """The tiny files in the server's folders under this test file's names, the tokenizer beside the text encoder."""
    from tests.test_comfyui_workflows import put, with_tokenizer

    comfy = tiny_files["comfy"] / "models"
    names = {"dit": put(comfy_server, comfy / "diffusion_models" / "qwen_image_tiny.safetensors", "diffusion_models", "tr_dit.safetensors"),
             "te": put(comfy_server, comfy / "text_encoders" / "qwen_2.5_vl_tiny.safetensors", "text_encoders", "tr_te.safetensors"),
             "vae": put(comfy_server, comfy / "vae" / "qwen_image_vae_tiny.safetensors", "vae", "tr_vae.safetensors"),
             "not_a_dit": put(comfy_server, comfy / "vae" / "qwen_image_vae_tiny.safetensors", "diffusion_models",
                              "tr_not_a_dit.safetensors")}
    with_tokenizer(comfy_server, tiny_files["tokenizer"])
    return names


def train_node(models: dict, folder: Path, lora: str, steps: int, **extra) -> dict:
    inputs = {"image_folder": str(folder), "dit_name": models["dit"], "text_encoder_name": models["te"],
              "vae_name": models["vae"], "model_version": "auto", "lora_name": lora, "resolution": 64, "steps": steps,
              "learning_rate": 1e-2, "network_dim": 4, "network_alpha": 4.0, "seed": 3, "overwrite": False,
              "extra_flags": "--max_data_loader_n_workers 0"}
    return {"1": {"class_type": "flowtunerTrainLoRA", "inputs": {**inputs, **extra}}}


def reference_lora(tiny_files, folder: Path, root: Path, steps: int) -> dict:
    """`flowtuner train` run directly (in-process) on the same files, data and settings, one thread as the child."""
    comfy = tiny_files["comfy"] / "models"
    root.mkdir(parents=True)
    config = root / "dataset.toml"
    config.write_text(f'[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = true\n\n'
                      f'[[datasets]]\nimage_directory = "{folder}"\ncache_directory = "{root / "cache"}"\n')
    data = ["--dataset_config", str(config), "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["cache-latents", *data, "--vae", str(comfy / "vae" / "qwen_image_vae_tiny.safetensors")]) == 0
        assert main(["cache-text", *data, "--text_encoder", str(comfy / "text_encoders" / "qwen_2.5_vl_tiny.safetensors"),
                     "--tokenizer", str(tiny_files["tokenizer"])]) == 0
        assert main(["train", *data, "--dit", str(comfy / "diffusion_models" / "qwen_image_tiny.safetensors"),
                     "--output_dir", str(root / "out"), "--max_train_steps", str(steps), "--learning_rate", "1e-2",
                     "--network_dim", "4", "--network_alpha", "4", "--seed", "3", "--max_data_loader_n_workers", "0"]) == 0
    finally:
        torch.set_num_threads(threads)
    return load_file(root / "out" / "lora.safetensors")


@pytest.mark.slow
def test_node_lora_equals_flowtuner_train(comfy_server, server_models, tiny_files, tmp_path):
    folder = images_folder(tmp_path / "data")
    ws = Websocket(comfy_server.url)
    try:
        start = time.monotonic()
        entry = comfy_server.run(train_node(server_models, folder, "tr_node_lora", steps=4), timeout=300,
                                 client_id=ws.client_id)
        seconds = time.monotonic() - start
    finally:
        ws.close()
    text = entry["outputs"]["1"]["text"][0]
    print(f"\n[training node] 2 images, 4 steps over HTTP: {seconds:.1f} s\n{text}")
    lora = comfy_server.models / "loras" / "tr_node_lora.safetensors"
    assert lora.is_file() and "trained 4 steps" in text and str(lora) in text
    assert not list((comfy_server.models / "loras").glob(".*partial"))
    progress = ws.progress("1")  # ComfyUI's progress bar as the UI gets it, fed from the child's progress file
    assert progress and progress[-1] == (4, 4) and all(m == 4 for _, m in progress), progress
    assert [v for v, _ in progress] == sorted(v for v, _ in progress)

    ours, ref = load_file(lora), reference_lora(tiny_files, folder, tmp_path / "ref", steps=4)
    assert set(ours) == set(ref)
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key
    assert any(k.endswith("lora_up.weight") and ref[k].abs().max() > 0 for k in ref)  # it trained


@pytest.mark.slow
def test_bad_inputs_are_one_line_and_write_nothing(comfy_server, server_models, tmp_path):
    from tests.comfy_server import ComfyRunError

    loras = comfy_server.models / "loras"
    (tmp_path / "empty").mkdir()
    (loras / "tr_taken.safetensors").write_bytes(b"someone's LoRA")
    cases = [
        (tmp_path / "empty", "tr_bad", {}, "no images"),
        (images_folder(tmp_path / "nocap", missing_caption=True), "tr_bad", {}, "img1.png: no caption file (img1.txt)"),
        (images_folder(tmp_path / "ok"), "tr_taken", {}, "tr_taken.safetensors already exists"),
        (images_folder(tmp_path / "ok2"), "tr_bad", {"extra_flags": "--seed 1"}, "--seed is set by the seed widget"),
        (tmp_path / "ok" / "images", "tr_bad", {"dit_name": server_models["not_a_dit"]}, "expected a Qwen-Image DiT, but this looks like"),
    ]
    for folder, lora, extra, message in cases:
        with pytest.raises(ComfyRunError) as err:
            comfy_server.run(train_node(server_models, folder, lora, steps=2, **extra), timeout=60)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not (loras / "tr_bad.safetensors").exists() and (loras / "tr_taken.safetensors").read_bytes() == b"someone's LoRA"
    assert comfy_server.object_info("flowtunerTrainLoRA")  # still serving


@pytest.mark.slow
def test_interrupt_stops_the_run_and_leaves_nothing(comfy_server, server_models, tmp_path):
    """POST /interrupt (the Cancel button) while the node's first child runs: the run ends as interrupted at once,
    no child left, nothing in loras/. (The first child, not the train child: the stop is the same code for both,
    run_child's, and waiting for caching and the train child's start would cost this test ~13 s; the progress bar
    fed by training is test_node_lora_equals_flowtuner_train's.)"""
    import psutil

    from tests.comfy_server import ComfyRunError

    folder = images_folder(tmp_path / "data")
    outcome = {}

    def queue():
        try:
            outcome["entry"] = comfy_server.run(train_node(server_models, folder, "tr_interrupted", steps=100_000), timeout=300)
        except ComfyRunError as exc:
            outcome["entry"] = exc.entry

    server = psutil.Process(comfy_server.process.pid)

    def child():
        return [p for p in server.children(recursive=True) if "flowtuner" in " ".join(p.cmdline())]

    runner = threading.Thread(target=queue)
    runner.start()
    deadline = time.monotonic() + 120
    while not child() and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the process table: the child's start is not announced anywhere else
    assert runner.is_alive() and child(), outcome
    sent = time.monotonic()
    request = urllib.request.Request(comfy_server.url + "/interrupt", data=b"{}", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()  # the Cancel button's request; ComfyUI answers with no body
    runner.join(60)
    took = time.monotonic() - sent
    print(f"\n[training node] interrupted {took:.2f} s after POST /interrupt")
    assert not runner.is_alive()
    kinds = [kind for kind, _ in outcome["entry"]["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_error" not in kinds, kinds
    assert took < 10
    assert not child()
    assert not list((comfy_server.models / "loras").glob("tr_interrupted*"))
