"""The ComfyUI node pack's skeleton, install / uninstall, loaders and debug nodes.

Fast tests run the nodes in-process with the vendored ComfyUI on sys.path (the `comfy` fixture); the slow ones
run a real headless ComfyUI (tests/comfy_server.py) and talk to it over HTTP.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flowtuner.cli import main as cli_main
from flowtuner.cli import comfyui as install_cli

# -- the pack's registry ---------------------------------------------------------------------------------------


def test_pack_registers_each_module_and_names_failures(monkeypatch, caplog):
    import flowtuner.comfyui as pack

    for name in ("loaders", "debug"):
        module = importlib.import_module(f"flowtuner.comfyui.{name}")
        for key, cls in module.NODES.items():
            assert key.startswith("flowtuner") and pack.NODE_CLASS_MAPPINGS[key] is cls
            assert pack.NODE_DISPLAY_NAME_MAPPINGS[key] == module.DISPLAY[key]
    # a module that cannot import: one error line naming it, the other modules' nodes still there
    monkeypatch.setitem(sys.modules, "flowtuner.comfyui.debug", None)
    with caplog.at_level(logging.ERROR, logger="flowtuner.comfyui"):
        importlib.reload(pack)
    try:
        lines = [r.getMessage() for r in caplog.records if "'debug'" in r.getMessage()]
        assert len(lines) == 1 and "failed to load" in lines[0] and "\n" not in lines[0]
        assert "debug" in pack.FAILED and "flowtunerLatentStats" not in pack.NODE_CLASS_MAPPINGS
        assert "flowtunerDiTLoader" in pack.NODE_CLASS_MAPPINGS
    finally:
        monkeypatch.undo()
        importlib.reload(pack)
    assert "flowtunerLatentStats" in pack.NODE_CLASS_MAPPINGS


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers: ~15 s on 2 cores
def test_pack_import_does_not_import_comfyui():
    code = ("import sys, flowtuner.comfyui as p; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'nodes', 'comfy_extras')); "
            "print(bad); assert not bad, bad; assert p.NODE_CLASS_MAPPINGS")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


# -- install / uninstall ---------------------------------------------------------------------------------------


@pytest.fixture
def comfy_dir(tmp_path):
    root = tmp_path / "ComfyUI"
    (root / "custom_nodes").mkdir(parents=True)
    (root / "main.py").write_text("# stand-in\n")
    return root


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_install_uninstall_with_this_python(comfy_dir, capsys):
    before = listing(comfy_dir)
    assert cli_main(["comfyui", "install", "--comfyui_dir", str(comfy_dir), "--python", sys.executable]) == 0
    shim = comfy_dir / "custom_nodes" / "flowtuner" / "__init__.py"
    assert "from flowtuner.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS" in shim.read_text()
    record = json.loads((shim.parent / install_cli.MANIFEST).read_text())
    assert record["written"] == [str(shim)]  # this Python imports flowtuner already: no .pth
    # the shim works as ComfyUI loads it: a module from a file path
    spec = importlib.util.spec_from_file_location("flowtuner_shim_test", shim)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "flowtunerLatentStats" in module.NODE_CLASS_MAPPINGS
    (shim.parent / "__pycache__").mkdir()
    (shim.parent / "__pycache__" / "__init__.cpython-312.pyc").write_bytes(b"")
    assert cli_main(["comfyui", "install", "--comfyui_dir", str(comfy_dir), "--python", sys.executable]) == 0  # again: fine
    assert cli_main(["comfyui", "uninstall", "--comfyui_dir", str(comfy_dir)]) == 0
    assert listing(comfy_dir) == before


def test_install_pth_into_another_python(comfy_dir, tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    site.mkdir()
    found = {name: True for name in install_cli.REQUIRED_IMPORTS}
    monkeypatch.setattr(install_cli, "probe", lambda python: {"purelib": str(site), "flowtuner": None, "found": found})
    assert cli_main(["comfyui", "install", "--comfyui_dir", str(comfy_dir), "--python", sys.executable]) == 0
    pth = site / install_cli.PTH_NAME
    assert pth.read_text().strip() == str(install_cli.package_root())
    assert (install_cli.package_root() / "flowtuner" / "comfyui" / "__init__.py").is_file()
    assert cli_main(["comfyui", "uninstall", "--comfyui_dir", str(comfy_dir)]) == 0
    assert not pth.exists() and not (comfy_dir / "custom_nodes" / "flowtuner").exists()


def test_install_refusals_are_one_line(comfy_dir, tmp_path, capsys):
    def refused(*argv) -> str:
        assert cli_main(["comfyui", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("flowtuner comfyui: error:"), err
        return err

    assert "neither main.py nor custom_nodes/" in refused("install", "--comfyui_dir", str(tmp_path))
    assert "not installed" in refused("uninstall", "--comfyui_dir", str(comfy_dir))
    assert "no such file" in refused("install", "--comfyui_dir", str(comfy_dir), "--python", str(tmp_path / "nope"))
    theirs = comfy_dir / "custom_nodes" / "flowtuner"
    theirs.mkdir()
    (theirs / "__init__.py").write_text("# someone else's\n")
    assert "was not written by" in refused("install", "--comfyui_dir", str(comfy_dir), "--python", sys.executable)
    assert "was not written by" in refused("uninstall", "--comfyui_dir", str(comfy_dir))
    assert (theirs / "__init__.py").read_text() == "# someone else's\n"


def test_install_names_missing_packages_of_a_bare_python(comfy_dir, tmp_path, capsys):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    assert cli_main(["comfyui", "install", "--comfyui_dir", str(comfy_dir), "--python", str(python)]) == 2
    err = capsys.readouterr().err
    assert "lacks packages flowtuner needs" in err and "diffusers" in err and f"{python} -m pip install" in err
    assert not (comfy_dir / "custom_nodes" / "flowtuner").exists()  # nothing written


def test_install_finds_the_venv_inside_comfyui(comfy_dir):
    (comfy_dir / "venv" / "bin").mkdir(parents=True)
    (comfy_dir / "venv" / "bin" / "python").write_text("")
    assert install_cli.find_python(comfy_dir, None) == (comfy_dir / "venv" / "bin" / "python").absolute()
    assert install_cli.find_python(comfy_dir.parent, None) == Path(sys.executable)


# -- loaders (in-process) ----------------------------------------------------------------------------------------


@pytest.fixture
def folders(comfy, tiny_files, tmp_path, monkeypatch):
    """ComfyUI's folder_paths pointed at the tiny files (restored after the test)."""
    import folder_paths

    models = tiny_files["comfy"] / "models"
    diffusers = tmp_path / "diffusers"
    diffusers.mkdir()
    (diffusers / "tiny-repo").symlink_to(tiny_files["repo"])
    te_folder = tmp_path / "text_encoders"
    te_folder.mkdir()
    (te_folder / "qwen_hf").symlink_to(tiny_files["repo"] / "text_encoder")
    odd = tmp_path / "odd"
    odd.mkdir()
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2),
               "model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2)}, odd / "sdxl_like.safetensors")
    table = {
        "diffusion_models": ([str(models / "diffusion_models"), str(odd)], {".safetensors"}),
        "text_encoders": ([str(models / "text_encoders"), str(te_folder)], {".safetensors"}),
        "vae": ([str(models / "vae")], {".safetensors"}),
        "diffusers": ([str(diffusers)], ["folder"]),
    }
    for kind, value in table.items():
        monkeypatch.setitem(folder_paths.folder_names_and_paths, kind, value)
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    from flowtuner.comfyui import loaders

    yield loaders
    for slot in loaders.SLOTS.values():
        slot.clear()


def test_dropdowns_list_files_folders_and_diffusers_repos(folders):
    dits = folders.choices("diffusion_models")
    assert {"qwen_image_tiny.safetensors", "qwen_image_tiny_prefixed.safetensors", "sdxl_like.safetensors",
            "diffusers/tiny-repo"} <= set(dits)
    tes = folders.choices("text_encoders")
    assert {"qwen_2.5_vl_tiny.safetensors", "qwen_hf/", "diffusers/tiny-repo"} <= set(tes)
    assert not any(t.startswith("qwen_hf/") and t != "qwen_hf/" for t in tes)  # the folder's shards are not listed
    assert set(folders.choices("vae")) >= {"qwen_image_vae_tiny.safetensors", "diffusers/tiny-repo"}
    assert folders.resolve("diffusion_models", "diffusers/tiny-repo").name == "transformer"


def test_dit_loader_versions_and_fp8(folders, tiny_files):
    model, = folders.DiTLoader().load("qwen_image_tiny_prefixed.safetensors", "default", "auto")
    assert model.version == "original" and not model.fp8
    denoiser = model.denoiser("cpu")
    assert denoiser is model.denoiser("cpu")  # kept between runs
    assert sum(p.numel() for p in denoiser.module.parameters()) > 0
    edit, = folders.DiTLoader().load("qwen_image_tiny.safetensors", "fp8_scaled", "edit-2509")
    assert edit.version == "edit-2509" and edit.fp8 and edit.fp8_scaled
    assert type(edit.family).__name__ == "QwenImageEditFamily"
    fp8 = edit.denoiser("cpu")
    assert any(p.dtype == torch.float8_e4m3fn for p in fp8.module.parameters())
    assert edit.with_loras([("x.safetensors", 0.5)]).loras == (("x.safetensors", 0.5),) and edit.loras == ()


@pytest.mark.parametrize("name, version, message", [
    ("missing.safetensors", "auto", "missing.safetensors: not found in ComfyUI's diffusion_models folders"),
    ("sdxl_like.safetensors", "auto", "a sdxl model; this loader runs Qwen-Image DiTs"),
    ("sdxl_like.safetensors", "original", "contradicts the model files"),
])
def test_dit_loader_refusals_are_one_line(folders, name, version, message):
    with pytest.raises(folders.NodeError) as err:
        folders.DiTLoader().load(name, "default", version)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_dit_loader_refuses_a_vae_file(folders, tiny_files, monkeypatch):
    import folder_paths

    vae_dir = str(tiny_files["comfy"] / "models" / "vae")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([vae_dir], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    with pytest.raises(folders.NodeError, match="expected a Qwen-Image DiT, but this looks like"):
        folders.DiTLoader().load("qwen_image_vae_tiny.safetensors", "default", "auto")


def test_text_encoder_loader_single_file_and_folder(folders):
    from flowtuner.families import get_family

    te, = folders.TextEncoderLoader().load("qwen_2.5_vl_tiny.safetensors")
    encoder = te.encoder(get_family("qwen_image"), "cpu")
    cond, = encoder.encode(["a red cube"])
    folder_te, = folders.TextEncoderLoader().load("qwen_hf/")
    cond2, = folder_te.encoder(get_family("qwen_image"), "cpu").encode(["a red cube"])
    assert torch.equal(cond.embeds, cond2.embeds)  # same weights, two layouts
    with pytest.raises(folders.NodeError, match="not found in ComfyUI's text_encoders folders"):
        folders.TextEncoderLoader().load("nope.safetensors")


def test_vae_loader_is_a_comfyui_vae(folders, tiny_files):
    import nodes

    from flowtuner.families.qwen_image.vae import QwenImageCodec, load_vae

    vae, = folders.VAELoader().load("qwen_image_vae_tiny.safetensors")
    codec = QwenImageCodec(load_vae(tiny_files["repo"] / "vae"))
    pixels = torch.rand(1, 32, 48, 4)  # ComfyUI's VAEEncode drops the alpha channel itself
    latent, = nodes.VAEEncode().encode(vae, pixels)
    normalised = codec.encode(pixels[..., :3].movedim(-1, 1))
    assert latent["samples"].shape == (1, 16, 1, 4, 6)
    # LATENT holds raw latents (ComfyUI's convention): normalised x std + mean
    torch.testing.assert_close(latent["samples"], normalised * codec.std + codec.mean, rtol=1e-5, atol=1e-5)
    for samples in (latent["samples"], latent["samples"][:, :, 0]):  # VAEEncode's 5D and EmptySD3LatentImage's 4D
        images, = nodes.VAEDecode().decode(vae, {"samples": samples})
        assert images.shape == (1, 32, 48, 3)
        torch.testing.assert_close(images, codec.decode(normalised).permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


# -- debug nodes: hand-computed values ---------------------------------------------------------------------------


def test_latent_stats_by_hand():
    from flowtuner.comfyui.debug import LatentStats

    samples = torch.tensor([[[[1.0, 3.0]], [[-2.0, float("nan")]]]])  # [1, 2, 1, 2]
    out = LatentStats().report({"samples": samples})
    text = out["result"][0]
    assert out["ui"]["text"] == [text]
    # finite: 1, 3, -2 -> mean 2/3, population std sqrt(((1/3)^2 + (7/3)^2 + (8/3)^2) / 3) = sqrt(114/27)
    assert "shape [1, 2, 1, 2] float32" in text and "mean 0.666667" in text
    assert f"std {math.sqrt(114 / 27):.6g}" in text and "min -2 max 3 nan 1 inf 0" in text
    assert "c0: mean 2 std 1" in text and "c1: mean -2 std 0" in text


def test_conditioning_stats_by_hand():
    from flowtuner.comfyui.debug import ConditioningStats

    embeds = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]]])  # token norms 5, 0, 10
    cond = [[embeds, {"attention_mask": torch.tensor([[1, 0, 1]]), "reference_latents": [torch.zeros(1, 16, 2, 2)]}]]
    text = ConditioningStats().report(cond)["result"][0]
    assert "conditioning: 1 entry" in text and "tokens 3 per item, valid [2]" in text
    assert "token norms: mean 5 min 0 max 10" in text and "reference_latents: 1" in text
    plain = ConditioningStats().report([[embeds, {}]])["result"][0]
    assert "valid [3] (no attention_mask)" in plain and "reference_latents: 0" in plain


def test_compare_by_hand():
    from flowtuner.comfyui.debug import CompareConditionings, CompareLatents

    a, b = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 4.0])
    text = CompareLatents().report({"samples": a}, {"samples": b})["result"][0]
    # diff (0, 0, 2): max abs 2, max rel 2 / 4, rel l2 2 / sqrt(21), cosine 13 / (3 sqrt(21))
    assert "max abs 2 " in text and "max rel 0.5 " in text
    assert f"rel l2 {2 / math.sqrt(21):.6g}" in text and f"cosine {13 / (3 * math.sqrt(21)):.6g}" in text
    same = CompareLatents().report({"samples": a}, {"samples": a.clone()})["result"][0]
    assert "max abs 0 " in same and "cosine 1" in same
    assert "shapes differ" in CompareLatents().report({"samples": a}, {"samples": a[:2]})["result"][0]
    ca = [[a.view(1, 3, 1), {"reference_latents": [a]}]]
    cb = [[b.view(1, 3, 1), {"reference_latents": [b, b], "attention_mask": torch.ones(1, 3)}]]
    text = CompareConditionings().report(ca, cb)["result"][0]
    assert "embeds: max abs 2" in text and "reference_latents: 1 vs 2" in text
    assert "attention_mask: only in b" in text and "keys in one only: ['attention_mask']" in text


def test_model_info(folders):
    from flowtuner.comfyui.debug import ModelInfo

    model, = folders.DiTLoader().load("qwen_image_tiny.safetensors", "fp8_e4m3fn", "auto")
    text = ModelInfo().report(model=model.with_loras([("l.safetensors", 0.5)]))["result"][0]
    assert "version original" in text and "blocks" in text and "fp8 True" in text and "lora l.safetensors x0.5" in text


# -- a real ComfyUI over HTTP ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_server_lists_every_node_with_its_inputs(comfy_server, comfy):
    import flowtuner.comfyui as pack

    info = comfy_server.object_info()
    assert NODES_OF_MINE <= set(pack.NODE_CLASS_MAPPINGS)
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert name.startswith("flowtuner") and name in info, f"{name} missing from /object_info"
        assert info[name]["display_name"] == pack.NODE_DISPLAY_NAME_MAPPINGS[name]
        wanted = cls.INPUT_TYPES()  # in-process, with the vendored tree's folder_paths: the names are what count
        for group in ("required", "optional"):
            assert set(info[name]["input"].get(group, {})) == set(wanted.get(group, {})), name
    assert {n for n in info if n.startswith("flowtuner")} == set(pack.NODE_CLASS_MAPPINGS)
    assert not pack.FAILED and "failed to load" not in comfy_server.log(), comfy_server.log()[-2000:]


# every node of the pack: a module that stops importing drops its nodes from both sides, so they are listed here
NODES_OF_MINE = {"flowtunerDiTLoader", "flowtunerTextEncoderLoader", "flowtunerVAELoader", "flowtunerModelInfo",
                 "flowtunerLatentStats", "flowtunerConditioningStats", "flowtunerCompareLatents",
                 "flowtunerCompareConditionings", "flowtunerTextEncode", "flowtunerSampler", "flowtunerLoraLoader",
                 "flowtunerQwenPAG", "flowtunerTrainLoRA"}


@pytest.mark.slow
def test_server_latent_stats_workflow(comfy_server):
    workflow = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 32, "batch_size": 2}},
        "2": {"class_type": "flowtunerLatentStats", "inputs": {"samples": ["1", 0]}},
    }
    entry = comfy_server.run(workflow)
    text = entry["outputs"]["2"]["text"][0]
    assert "latent shape [2, 4, 4, 8] float32 mean 0 std 0 min 0 max 0 nan 0 inf 0" in text
    assert text in comfy_server.log()  # printed to the console too


@pytest.mark.slow
def test_server_shows_our_one_line_and_stays_up(comfy_server, tiny_files):
    import shutil

    from tests.comfy_server import ComfyRunError

    dm = comfy_server.models / "diffusion_models"
    shutil.copy(tiny_files["comfy"] / "models" / "vae" / "qwen_image_vae_tiny.safetensors", dm / "not_a_dit.safetensors")
    shutil.copy(tiny_files["comfy"] / "models" / "diffusion_models" / "qwen_image_tiny.safetensors", dm / "tiny_dit.safetensors")

    def info_of(dit_name: str) -> dict:
        return {"1": {"class_type": "flowtunerDiTLoader", "inputs": {"dit_name": dit_name, "weight_dtype": "default",
                                                                     "model_version": "auto"}},
                "2": {"class_type": "flowtunerModelInfo", "inputs": {"model": ["1", 0]}}}

    with pytest.raises(ComfyRunError) as err:
        comfy_server.run(info_of("not_a_dit.safetensors"))
    assert "expected a Qwen-Image DiT, but this looks like" in str(err.value) and "\n" not in str(err.value)
    assert err.value.entry["status"]["status_str"] == "error"
    entry = comfy_server.run(info_of("tiny_dit.safetensors"))  # the server is still up and serving
    assert "version original" in entry["outputs"]["2"]["text"][0]


@pytest.mark.slow
def test_server_reports_a_failing_module(tmp_path):
    from tests.comfy_server import start_server

    server = start_server(tmp_path / "base", fail_module="debug")
    try:
        info = server.object_info()
        lines = [line for line in server.log().splitlines() if "node module 'debug' failed to load" in line]
        assert len(lines) == 1, server.log()[-3000:]
        assert "flowtunerLatentStats" not in info and "flowtunerDiTLoader" in info
    finally:
        server.stop()
