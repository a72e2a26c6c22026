"""The training node: an image folder with captions -> a LoRA in ComfyUI's loras folder.

flowtuner's own commands do the work in two child processes of ComfyUI's Python (`cache-latents` then
`cache-text` chained in one, `python -m flowtuner.cli.chain`; then `python -m flowtuner train`): a separate
process gives the text encoder's and the DiT's memory back to the system when it ends, and a crash or an
out-of-memory kill there does not take ComfyUI down. What the node
adds is ComfyUI's side: the model files from its folders, a dataset config written for the folder, the device
ComfyUI runs on, its progress bar (fed by `flowtuner train --progress_file`, train/progress.py), its Cancel
button (the child is terminated, then killed after KILL_AFTER_S), one-line errors in its error box, and the
LoRA moved into models/loras only once training succeeded.

Checks that need no model run in the node before any child starts: the LoRA name, the extra flags, the model
files (the loaders' checks), the image folder (flowtuner's dataset listing: no images, a missing caption).
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from flowtuner.cli.chain import MARKER
from flowtuner.comfyui.loaders import (VERSION_CHOICES, DiTLoader, NodeError, TextEncoderLoader, _model_paths,
                                       choices, comfyui_install_dir, node_errors, resolve)
from flowtuner.errors import ConfigError

log = logging.getLogger(__name__)

CATEGORY = "flowtuner/training"
POLL_S = 0.2  # how often the node looks at the child, its progress file and ComfyUI's interrupt flag
KILL_AFTER_S = 10.0  # a terminated child still alive after this long is killed
TAIL_CHARS = 64_000  # the end of a child's output kept to find its error line
WORK_ROOT = "flowtuner-train"  # under ComfyUI's output folder
LORA_STEM = "lora"  # train's --output_name inside the work folder

# `flowtuner train` flags the node sets itself: in extra_flags they are refused (a later flag would silently win)
OWN_FLAGS = {
    "max_train_steps": "the steps widget", "learning_rate": "the learning_rate widget",
    "network_dim": "the network_dim widget", "network_alpha": "the network_alpha widget", "seed": "the seed widget",
    "dit": "the dit_name widget", "vae": "the vae_name widget", "text_encoder": "the text_encoder_name widget",
    "model_version": "the model_version widget", "edit": "the model_version widget",
    "edit_plus": "the model_version widget", "model": "the model widgets", "tokenizer": "the text encoder's folder",
    "comfyui_dir": "the running ComfyUI", "dataset_config": "the image_folder input",
    "output_dir": "the lora_name widget", "output_name": "the lora_name widget", "progress_file": "the node",
}


# -- pure parts: names, flags, the dataset config, the command lines ----------------------------------------------

def lora_relative(name: str) -> PurePosixPath:
    """The lora_name widget -> its path inside the loras folder (subfolders allowed, ".safetensors" added)."""
    text = name.strip().replace("\\", "/")
    if text.lower().endswith(".safetensors"):
        text = text[: -len(".safetensors")]
    path = PurePosixPath(text)
    if not text or path.is_absolute() or any(p in ("", ".", "..") for p in text.split("/")) or ":" in text:
        raise ConfigError(f"lora_name {name!r}: give a file name such as my_style (or sub/my_style) inside the loras folder.")
    return path.with_name(path.name + ".safetensors")


def _train_parser() -> argparse.ArgumentParser:
    from flowtuner.config.fields import add_arguments
    from flowtuner.config.musubi import TRAIN, add_musubi_flags
    from flowtuner.config.train import TrainConfig

    parser = argparse.ArgumentParser(prog="flowtuner train", add_help=False, exit_on_error=False, allow_abbrev=False)
    add_arguments(parser, TrainConfig)
    add_musubi_flags(parser, TRAIN)
    return parser


_UNSET = object()


def parse_extra_flags(text: str) -> list[str]:
    """The extra_flags widget: more `flowtuner train` flags (shlex-split); unknown flags, bad values and the flags
    the node sets are one-line errors here, before anything runs."""
    try:
        tokens = shlex.split(text or "", comments=True)
    except ValueError as exc:
        raise ConfigError(f"extra_flags: {exc} (quote values as in a shell).") from None
    if not tokens:
        return []
    parser = _train_parser()
    parser.set_defaults(**{a.dest: _UNSET for a in parser._actions})  # what stays _UNSET was not given
    try:
        args, unknown = parser.parse_known_args(tokens)
    except argparse.ArgumentError as exc:
        raise ConfigError(f"extra_flags: {exc}.") from None
    if unknown:
        raise ConfigError(f"extra_flags: {' '.join(unknown)}: not a flowtuner train flag (flowtuner train --help lists them).")
    for name, value in vars(args).items():
        if value is not _UNSET and name in OWN_FLAGS:
            raise ConfigError(f"extra_flags: --{name} is set by {OWN_FLAGS[name]}; remove it from extra_flags.")
    return tokens


def flag_value(tokens: list[str], flag: str) -> str | None:
    """The last value of `--flag V` / `--flag=V` in tokens (as argparse reads it), else None."""
    value = None
    for i, tok in enumerate(tokens):
        if tok == flag and i + 1 < len(tokens):
            value = tokens[i + 1]
        elif tok.startswith(flag + "="):
            value = tok.split("=", 1)[1]
    return value


def _toml_string(value) -> str:
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


def dataset_toml(images: Path, cache: Path, resolution: int, control: Path | None = None) -> str:
    """musubi-tuner's image_directory dataset: same-name .txt captions, aspect-ratio buckets of resolution^2 area."""
    lines = ["[general]", f"resolution = [{resolution}, {resolution}]", 'caption_extension = ".txt"', "batch_size = 1",
             "enable_bucket = true", "", "[[datasets]]", f"image_directory = {_toml_string(images)}",
             f"cache_directory = {_toml_string(cache)}"]
    if control is not None:
        lines.append(f"control_directory = {_toml_string(control)}")
    return "\n".join(lines) + "\n"


@dataclass
class Job:
    """Everything the three commands need, resolved."""

    work: Path
    dit: Path
    text_encoder: Path
    vae: Path
    version: str
    comfyui_dir: Path
    device: str
    steps: int
    learning_rate: float
    network_dim: int
    network_alpha: float
    seed: int
    extra: list[str] = field(default_factory=list)

    @property
    def dataset_config(self) -> Path:
        return self.work / "dataset.toml"

    @property
    def output_dir(self) -> Path:
        return self.work / "train"

    @property
    def progress_file(self) -> Path:
        return self.work / "progress.jsonl"

    @property
    def lora_file(self) -> Path:
        return self.output_dir / f"{LORA_STEM}.safetensors"


def commands(job: Job) -> list[tuple[str, list[str]]]:
    """(command, its flags) in the order they run."""
    common = ["--dataset_config", str(job.dataset_config), "--model_version", job.version,
              "--comfyui_dir", str(job.comfyui_dir)]
    return [
        ("cache-latents", [*common, "--vae", str(job.vae), "--device", job.device]),
        ("cache-text", [*common, "--text_encoder", str(job.text_encoder), "--device", job.device]),
        ("train", [*common, "--dit", str(job.dit), "--vae", str(job.vae), "--text_encoder", str(job.text_encoder),
                   "--device", job.device, "--output_dir", str(job.output_dir), "--output_name", LORA_STEM,
                   "--max_train_steps", str(job.steps), "--learning_rate", repr(float(job.learning_rate)),
                   "--network_dim", str(job.network_dim), "--network_alpha", repr(float(job.network_alpha)),
                   "--seed", str(job.seed), "--progress_file", str(job.progress_file), *job.extra]),
    ]


def child_runs(job: Job) -> list[tuple[str, str, list[str]]]:
    """(kind, name, argv) of the two children: both caching commands chained in one (one interpreter start and
    import instead of two; the VAE is freed before the text encoder loads), then train in its own, which gets the
    text encoder's memory back from the system."""
    (lat, lat_flags), (txt, txt_flags), (train, train_flags) = commands(job)
    chain = json.dumps([[lat, *lat_flags], [txt, *txt_flags]])
    return [("caching", f"{lat} + {txt}", [sys.executable, "-m", "flowtuner.cli.chain", chain]),
            ("training", train, [sys.executable, "-m", "flowtuner", train, *train_flags])]


# what a failed child's output says, most specific first: (pattern finder, one line for ComfyUI's error box)
def _error_line(command: str, lines: list[str]) -> str | None:
    found = [line.strip() for line in lines if line.startswith("flowtuner ") and ": error: " in line]
    return found[-1] if found else None


def _cache_failures(command: str, lines: list[str]) -> str | None:
    failed = [line.strip()[len("failed: "):] for line in lines if line.strip().startswith("failed: ")]
    if not failed:
        return None
    more = f" (and {len(failed) - 1} more, listed in ComfyUI's console)" if len(failed) > 1 else ""
    return f"flowtuner {command}: error: {failed[0]}{more}"


ERROR_FINDERS = (_error_line, _cache_failures)


def child_error(command: str, returncode: int, output: str) -> str:
    """The one line of a failed child. A chained child (flowtuner.cli.chain) announces each command; the failed
    one is the last announced, and only its lines count."""
    lines = output.replace("\r", "\n").splitlines()
    started = [i for i, line in enumerate(lines) if line.startswith(MARKER)]
    if started:
        command, lines = lines[started[-1]][len(MARKER):].strip(), lines[started[-1] + 1:]
    for finder in ERROR_FINDERS:
        line = finder(command, lines)
        if line:
            return line
    last = next((line.strip() for line in reversed(lines) if line.strip()), "no output")
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"stopped with exit code {returncode}"
    return f"flowtuner {command} {how} (out of memory?); its last line: {last[:300]}"


# -- running a child ----------------------------------------------------------------------------------------------

def child_env() -> dict:
    """ComfyUI's environment, with the folder of this flowtuner first on PYTHONPATH: the child runs the same code."""
    import flowtuner

    env = dict(os.environ)
    root = str(Path(flowtuner.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


class Interrupted(Exception):
    """ComfyUI's interrupt reached the node while a child ran (the child is stopped by then)."""


def _comfy_interrupted() -> bool:
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def _echo(stream, out_text: list[str], echo) -> None:
    """Copy the child's output to ComfyUI's console as it comes (tqdm's carriage returns included), keeping the tail."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    size = 0
    for chunk in iter(lambda: stream.read1(65536), b""):
        text = decoder.decode(chunk)
        if echo is not None:
            echo.write(text)
            echo.flush()
        out_text.append(text)
        size += len(text)
        if size > 2 * TAIL_CHARS:  # keep memory bounded on long runs
            joined = "".join(out_text)[-TAIL_CHARS:]
            out_text[:] = [joined]
            size = len(joined)
    out_text.append(decoder.decode(b"", final=True))


def stop(proc: subprocess.Popen, kill_after_s: float = KILL_AFTER_S) -> None:
    """terminate (SIGTERM: Python's default ends the process at once), then kill if it is still there."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=kill_after_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_child(command: str, flags: list[str], on_poll=None, interrupted=_comfy_interrupted, echo=sys.stderr,
              poll_s: float = POLL_S, kill_after_s: float = KILL_AFTER_S, argv: list[str] | None = None) -> str:
    """Run `python -m flowtuner COMMAND FLAGS` (or `argv`) to its end; returns its output. A failure raises
    NodeError with the child's one line; ComfyUI's interrupt stops the child and raises Interrupted. Whatever
    ends the wait (an exception from on_poll too), the child does not outlive this call."""
    argv = argv or [sys.executable, "-m", "flowtuner", command, *flags]
    log.info("[flowtuner] running: %s", shlex.join(argv))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=child_env())
    output: list[str] = []
    reader = threading.Thread(target=_echo, args=(proc.stdout, output, echo), daemon=True)
    reader.start()
    try:
        while True:
            try:
                returncode = proc.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            if on_poll is not None:
                on_poll()
            if interrupted():
                stop(proc, kill_after_s)
                raise Interrupted(command)
    finally:
        stop(proc, kill_after_s)
        reader.join()
        proc.stdout.close()
    if on_poll is not None:
        on_poll()
    text = "".join(output)
    if returncode != 0:
        raise NodeError(child_error(command, returncode, text))
    return text


class ProgressReader:
    """Feeds ComfyUI's progress bar from the train child's --progress_file; keeps the last record."""

    def __init__(self, path: Path, bar):
        self.path, self.bar, self.offset, self.last = path, bar, 0, None

    def __call__(self) -> None:
        from flowtuner.train.progress import read_progress

        records, self.offset = read_progress(self.path, self.offset)
        for record in records:
            self.last = record
            if self.bar is not None:
                self.bar.update_absolute(record["step"], record["total"])


# -- the ComfyUI side: folders, device, memory, the final move ------------------------------------------------------

def _folder(kind: str, text: str) -> Path:
    """A folder input: absolute, or relative to ComfyUI's input folder."""
    import folder_paths

    if not text.strip():
        raise ConfigError(f"{kind}: give a folder (absolute, or relative to ComfyUI's input folder).")
    path = Path(text.strip()).expanduser()
    path = path if path.is_absolute() else Path(folder_paths.get_input_directory()) / path
    if not path.is_dir():
        raise ConfigError(f"{kind} {text.strip()}: no such folder ({path}).")
    return path


def comfy_device() -> str:
    """The device ComfyUI computes on (cpu under --cpu, else its GPU, e.g. cuda:0)."""
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    return str(device)


def free_device_memory(device: str) -> None:
    """ComfyUI's loaded models and the pack's kept DiT / text encoder leave the GPU for the child's use."""
    if device.split(":")[0] == "cpu":
        return
    import comfy.model_management

    from flowtuner.comfyui.loaders import release

    for slot in ("dit", "text_encoder"):
        release(slot)
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def loras_root() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def lora_target(name: str, overwrite: bool) -> Path:
    target = loras_root() / lora_relative(name)
    if target.exists() and not overwrite:
        raise ConfigError(f"{target.name} already exists in {target.parent}; choose another lora_name or set overwrite.")
    return target


def place_lora(trained: Path, target: Path, overwrite: bool) -> None:
    """Into the loras folder under its name in one rename: the folder never shows a partial file (the copy, when
    the work folder is on another disk, goes to a hidden name ComfyUI does not list)."""
    if target.exists() and not overwrite:
        raise ConfigError(f"{target.name} appeared in {target.parent} while training; the LoRA stays at {trained}.")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(trained, target)
        return
    except OSError:
        pass  # another file system
    fd, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(trained, partial)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def work_folder(target: Path) -> Path:
    import folder_paths

    root = Path(folder_paths.get_output_directory()) / WORK_ROOT
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{target.stem}_{time.strftime('%Y%m%d-%H%M%S')}_", dir=root))


def check_images(config: Path) -> None:
    """flowtuner's dataset listing: no images, or an error (a missing caption, ...), stops here."""
    from flowtuner.data.config import load_dataset_config
    from flowtuner.data.sources import collect_items

    for ds in load_dataset_config(config):
        items, problems = collect_items(ds)
        errors = [p for p in problems if p.severity == "error"]
        for problem in errors:
            log.error("[flowtuner] %s", problem)
        if errors:
            more = f" ({len(errors)} problems, listed in ComfyUI's console)" if len(errors) > 1 else ""
            raise ConfigError(f"{errors[0].path}: {errors[0].message}{more}.")
        if not items:
            raise ConfigError(f"image_folder {ds.image_directory}: no images (png, jpg, webp, ... each with a "
                              "same-name .txt caption).")


def folder_fingerprint(*folders: str) -> str:
    """What ComfyUI compares to decide whether to run the node again: the folders' file names, sizes and times."""
    digest = hashlib.sha256()
    for text in folders:
        try:
            entries = sorted(os.scandir(_folder("folder", text)), key=lambda e: e.name) if text.strip() else []
        except (ConfigError, OSError):
            entries = []
        for e in entries:
            if e.is_file():
                st = e.stat()
                digest.update(f"{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# -- the node -----------------------------------------------------------------------------------------------------

def _validated_models(dit_name: str, text_encoder_name: str, vae_name: str, model_version: str):
    """The loaders' checks (file headers, version, tokenizer) without loading weights."""
    model, = DiTLoader().load(dit_name, "default", model_version)
    text_encoder, = TextEncoderLoader().load(text_encoder_name)
    vae = resolve("vae", vae_name)
    model.family.validate(_model_paths(vae=vae), ("vae",))
    return model, text_encoder.paths.text_encoder, vae


def _report(job: Job, last: dict | None, seconds: dict, target: Path) -> str:
    loss = (f"final loss {last['loss']:.4g} (mean over the last {min(last['step'], 50)} steps {last['avg_loss']:.4g})"
            if last and "loss" in last else "no loss recorded")
    return (f"trained {last['step'] if last else 0} steps, {loss}; {seconds['total']:.1f} s "
            f"(caching {seconds['caching']:.1f} s, training {seconds['training']:.1f} s) on {job.device}\n"
            f"LoRA: {target}\nwork folder: {job.work}")


class TrainLoRA:
    DESCRIPTION = ("Trains a Qwen-Image LoRA on a folder of images with same-name .txt captions, with flowtuner's "
                   "cache-latents, cache-text and train run in child processes of ComfyUI's Python, and saves it in "
                   "models/loras. Progress shows on the node; Cancel stops the run and writes no LoRA.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("lora_name", "report")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image_folder": ("STRING", {"default": "", "tooltip": "images with same-name .txt captions (musubi-tuner's "
                                                                  "image_directory); absolute, or relative to ComfyUI's input folder"}),
            "dit_name": (choices("diffusion_models"), {"tooltip": "the DiT to train on, as the flowtuner DiT loader lists it"}),
            "text_encoder_name": (choices("text_encoders"), {"tooltip": "Qwen2.5-VL, for the captions"}),
            "vae_name": (choices("vae"), {"tooltip": "the Qwen-Image VAE, for the images"}),
            "model_version": (list(VERSION_CHOICES), {"tooltip": "auto: as the files say, else original"}),
            "lora_name": ("STRING", {"default": "my_lora", "tooltip": "saved as models/loras/<name>.safetensors"}),
            "resolution": ("INT", {"default": 1024, "min": 64, "max": 4096, "step": 16,
                                   "tooltip": "training area resolution x resolution; aspect-ratio buckets of that area"}),
            "steps": ("INT", {"default": 1000, "min": 1, "max": 1_000_000, "tooltip": "optimizer steps (--max_train_steps)"}),
            "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-8, "max": 1.0, "step": 1e-5, "round": False}),
            "network_dim": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip": "LoRA rank"}),
            "network_alpha": ("FLOAT", {"default": 16.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                        "tooltip": "LoRA alpha; the LoRA's scale is alpha / rank"}),
            "seed": ("INT", {"default": 42, "min": 0, "max": 2**63 - 1}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip": "replace an existing LoRA of that name"}),
        }, "optional": {
            "extra_flags": ("STRING", {"default": "", "multiline": True,
                                       "tooltip": "more flowtuner train flags (musubi-tuner's names), e.g. "
                                                  "--mixed_precision bf16 --gradient_checkpointing --fp8_base"}),
            "control_folder": ("STRING", {"default": "", "tooltip": "edit models: control images named as the "
                                                                    "targets (musubi-tuner's control_directory)"}),
        }}

    @classmethod
    def IS_CHANGED(cls, image_folder="", control_folder="", **_):
        return folder_fingerprint(image_folder, control_folder or "")

    @node_errors
    def train(self, image_folder: str, dit_name: str, text_encoder_name: str, vae_name: str, model_version: str,
              lora_name: str, resolution: int, steps: int, learning_rate: float, network_dim: int, network_alpha: float,
              seed: int, overwrite: bool = False, extra_flags: str = "", control_folder: str = ""):
        began = time.monotonic()
        target = lora_target(lora_name, overwrite)
        extra = parse_extra_flags(extra_flags)
        model, text_encoder, vae = _validated_models(dit_name, text_encoder_name, vae_name, model_version)
        images = _folder("image_folder", image_folder)
        control = _folder("control_folder", control_folder) if control_folder.strip() else None
        job = Job(work_folder(target), model.paths.dit, text_encoder, vae, model.version, comfyui_install_dir(),
                  flag_value(extra, "--device") or comfy_device(), steps, learning_rate, network_dim, network_alpha,
                  seed, extra)
        try:
            job.dataset_config.write_text(dataset_toml(images, job.work / "cache", resolution, control), encoding="utf-8")
            check_images(job.dataset_config)
        except Exception:
            shutil.rmtree(job.work, ignore_errors=True)  # nothing ran: no folder left behind
            raise
        try:
            last, seconds = self._run(job)
            place_lora(job.lora_file, target, overwrite)
        finally:
            shutil.rmtree(job.work / "cache", ignore_errors=True)  # the caches are large; the rest stays for a look
        seconds["total"] = time.monotonic() - began
        text = _report(job, last, seconds, target)
        print(text, flush=True)
        name = str(target.relative_to(loras_root()))  # as ComfyUI lists it (os.sep between subfolders)
        return {"ui": {"text": [text]}, "result": (name, text)}

    def _run(self, job: Job) -> tuple[dict | None, dict]:
        import comfy.utils

        free_device_memory(job.device)
        bar = comfy.utils.ProgressBar(job.steps)
        progress = ProgressReader(job.progress_file, bar)
        seconds = {"caching": 0.0, "training": 0.0}
        for kind, command, argv in child_runs(job):
            start = time.monotonic()
            try:
                run_child(command, [], on_poll=progress if kind == "training" else None, argv=argv)
            except Interrupted:
                _raise_comfy_interrupt()
            seconds[kind] += time.monotonic() - start
        return progress.last, seconds


def _raise_comfy_interrupt():
    """ComfyUI's own exception, which its executor reports as an interrupted run (not an error)."""
    import comfy.model_management as mm

    mm.interrupt_current_processing(False)
    raise mm.InterruptProcessingException()


NODES = {"flowtunerTrainLoRA": TrainLoRA}
DISPLAY = {"flowtunerTrainLoRA": "flowtuner train LoRA (Qwen-Image)"}
