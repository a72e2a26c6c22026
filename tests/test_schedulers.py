"""ComfyUI's schedulers against the reference sigma vectors (../shared/reference/guidance-and-sampling.md §5)."""

from __future__ import annotations

import json
import math

import pytest

from flowtuner.cli import main
from flowtuner.flow.model_sampling import aura_flow, flux, time_snr_shift
from flowtuner.flow.schedulers import SCHEDULERS

AURA_31 = {
    "simple": [1, .965398, .925373, .878543, .823009, .756098, .673913, .570552, .436620, .256198, 0],
    "normal": [1, .961370, .915919, .861665, .795779, .714066, .610050, .473153, .284857, .009528, 0],
    "sgm_uniform": [1, .965513, .925640, .879014, .823759, .757237, .675609, .573072, .440411, .262065, 0],
    "beta": [1, .986737, .956716, .910297, .845286, .756834, .638541, .487780, .304983, .117024, 0],
    "karras": [1, .636775, .393058, .234105, .133772, .072809, .037397, .017908, .007863, .003094, 0],
    "exponential": [1, .526213, .276900, .145708, .076673, .040346, .021231, .011172, .005879, .003094, 0],
    "kl_optimal": [1, .839686, .701233, .578726, .467983, .365918, .270161, .178809, .090260, .003094, 0],
    "linear_quadratic": [1, .995, .990, .985, .980, .975, .932, .813, .618, .347, 0],
}
FLUX_115 = {
    "simple": [1, .966014, .926647, .880513, .825702, .759511, .677987, .575103, .441200, .259758, 0],
    "normal": [1, .961940, .917069, .863376, .797979, .716581, .612492, .474686, .283614, .000997, 0],
    "beta": [1, .987112, .957517, .911804, .847311, .759584, .642623, .491175, .306970, .115485, 0],
    "karras": [1, .575125, .315426, .163505, .079173, .035251, .014118, .004926, .001426, .000316, 0],
}


@pytest.mark.parametrize("name", sorted(AURA_31))
def test_auraflow_shift_3_1(name):
    assert SCHEDULERS[name](aura_flow(3.1), 10).tolist() == pytest.approx(AURA_31[name], abs=2e-6)


@pytest.mark.parametrize("name", sorted(FLUX_115))
def test_qwen_comfyui_default_flux_mu_1_15(name):
    assert SCHEDULERS[name](flux(1.15), 10).tolist() == pytest.approx(FLUX_115[name], abs=2e-6)


def test_sd3_simple_and_table_ends():
    sd3 = [1, .964286, .923077, .875, .818182, .75, .666667, .5625, .428571, .25, 0]
    assert SCHEDULERS["simple"](aura_flow(3.0), 10).tolist() == pytest.approx(sd3, abs=2e-6)
    assert aura_flow(3.1).sigma_min == pytest.approx(0.00309350, abs=1e-8)
    assert flux(1.15).sigma_min == pytest.approx(0.00031575, abs=1e-8)
    assert float(time_snr_shift(3.1, __import__("torch").tensor(0.5))) == pytest.approx(0.756098, abs=1e-6)


def test_sigmas_command_prints_json_and_plots(tmp_path, capsys):
    plot = tmp_path / "s.png"
    assert main(["sigmas", "--scheduler", "simple", "karras", "reference", "--steps", "10", "--shift", "3.1",
                 "--plot", str(plot)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["simple"] == pytest.approx(AURA_31["simple"], abs=2e-6)
    assert len(out["reference"]) == 11 and out["reference"][-2] == pytest.approx(0.02, abs=1e-6)
    assert plot.exists()


def test_sigmas_command_refuses_bad_sizes_in_one_line(capsys):
    for argv, message in ((["--steps", "-3"], "--steps must be >= 1, got -3."),
                          (["--image_size", "0", "8"], "--image_size 0 8: each side must be at least 16 pixels.")):
        assert main(["sigmas", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"flowtuner sigmas: error: {message}", err


def test_sigmas_command_model_sampling_modes(capsys):
    """--model_sampling flux takes mu from the image size (ComfyUI's ModelSamplingFlux: 1.15 at 1024^2,
    0.63 at 512^2); --mu fixes it; the reference schedule takes --base_shift/--max_shift/--shift_terminal."""
    from flowtuner.flow.model_sampling import flux, flux_mu

    assert flux_mu(1024, 1024) == pytest.approx(1.15) and flux_mu(512, 512) == pytest.approx(0.63)
    assert flux_mu(1328, 1328) == pytest.approx(1.622773, abs=1e-6)
    assert main(["sigmas", "--scheduler", "simple", "--steps", "10", "--model_sampling", "flux", "--image_size", "512", "512"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["simple"] == pytest.approx(SCHEDULERS["simple"](flux(0.63), 10).tolist(), abs=1e-6)
    assert main(["sigmas", "--scheduler", "simple", "--steps", "10", "--mu", "1.15"]) == 0
    assert json.loads(capsys.readouterr().out)["simple"] == pytest.approx(FLUX_115["simple"], abs=2e-6)
    assert main(["sigmas", "--scheduler", "reference", "--steps", "4", "--base_shift", str(math.log(3)),
                 "--max_shift", str(math.log(3)), "--shift_terminal", "0"]) == 0
    lightning = json.loads(capsys.readouterr().out)["reference"]
    assert lightning == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-6)  # shift 3: 3s / (1 + 2s) at s = 1, .75, .5, .25
    assert main(["sigmas", "--scheduler", "simple", "--steps", "4", "--shift", "3", "--mu", "1"]) == 2
