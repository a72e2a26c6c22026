"""musubi-tuner's command lines run unchanged: every option string of its Qwen-Image scripts' REAL parsers is
accepted by the matching flowtuner command, with the value musubi-tuner parses, refused where musubi-tuner
refuses its type; its documented commands parse; `--config_file` takes the same keys; LR schedules match
musubi-tuner's get_lr_scheduler (transformers' / diffusers' functions) step by step."""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
from pathlib import Path

import pytest
import torch

from flowtuner.cli import build_parser
from flowtuner.cli import caching, generate
from flowtuner.cli.train import config_file_values, configure
from flowtuner.config.caching import CacheLatentsConfig, CacheTextConfig
from flowtuner.config.musubi import CACHE_LATENTS, CACHE_TEXT, GENERATE, TRAIN
from flowtuner.errors import ConfigError
from flowtuner.train.optim import REFUSED, SCHEDULES, ScheduleOptions, make_schedule
from tests.shared import shared_path

# musubi-tuner script -> flowtuner command
SCRIPTS = {"qwen_image_cache_latents.py": "cache-latents", "qwen_image_cache_text_encoder_outputs.py": "cache-text",
           "qwen_image_train_network.py": "train", "qwen_image_train.py": "finetune",
           "qwen_image_generate_image.py": "generate"}
# a value that means something for options whose musubi-tuner type is a plain string
SAMPLES = {"model_version": ["original", "Edit-2509"], "lr_scheduler": ["cosine_with_restarts"], "optimizer_type": ["AdamW"],
           "network_module": ["networks.lora_qwen_image"], "network_args": ["loraplus_lr_ratio=4", "verbose=True"],
           "optimizer_args": ["weight_decay=0.01"], "lr_scheduler_args": ["T_max=100"]}
# flowtuner takes more values than musubi-tuner's choices here (and why)
WIDER = {"show_timesteps": "a PNG path besides musubi-tuner's image / console"}


class _Parsed(Exception):
    pass


@pytest.fixture(scope="module")
def musubi_parsers(musubi):
    """Each script's real parser, caught at its parse_args() call (the scripts build it inside main())."""
    import torch.cuda

    from musubi_tuner import qwen_image_cache_latents, qwen_image_cache_text_encoder_outputs, qwen_image_train, \
        qwen_image_train_network

    original = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0  # a default argument in wan's T5 module calls it at import
    try:
        from musubi_tuner import qwen_image_generate_image
    finally:
        torch.cuda.current_device = original

    def caught(entry) -> argparse.ArgumentParser:
        def stop(self, *args, **kwargs):
            raise _Parsed(self)

        real = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = stop
        try:
            entry()
        except _Parsed as got:
            return got.args[0]
        finally:
            argparse.ArgumentParser.parse_args = real
        raise AssertionError(f"{entry} never parsed")

    return {"cache-latents": caught(qwen_image_cache_latents.main),
            "cache-text": caught(qwen_image_cache_text_encoder_outputs.main),
            "train": caught(qwen_image_train_network.main), "finetune": caught(qwen_image_train.main),
            "generate": caught(qwen_image_generate_image.parse_args)}


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def samples(action: argparse.Action) -> list[list[str]]:
    """Valid command-line values for a musubi-tuner option, from its action."""
    if action.nargs == 0:
        return [[]]
    if action.dest in SAMPLES:
        return [[v] for v in SAMPLES[action.dest]] if action.nargs is None else [SAMPLES[action.dest]]
    if action.choices:
        return [[c] for c in action.choices]
    text = {int: "64", float: "0.5"}.get(action.type, "10" if getattr(action.type, "__name__", "") == "_int_or_float" else "x")
    count = action.nargs if isinstance(action.nargs, int) else 1
    return [[text] * count]


def required(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in options(parser) if a.required for s in (a.option_strings[0], *samples(a)[0])]


def musubi_cases(parsers) -> list[tuple[str, str, list[str]]]:
    return [(command, action.option_strings[0], value)
            for command, parser in parsers.items() for action in options(parser) for value in samples(action)]


_PARSER = build_parser()  # parsing does not change it; tests that set defaults build their own


def flowtuner_parse(command: str, argv: list[str]) -> argparse.Namespace:
    return _PARSER.parse_args([command, *argv])


# each command's namespace -> config step (musubi-tuner flags acted on, model version resolved)
CONFIGURE = {"train": configure, "finetune": configure, "generate": generate.configure,
             "cache-latents": lambda args: caching.configure(args, CacheLatentsConfig, CACHE_LATENTS),
             "cache-text": lambda args: caching.configure(args, CacheTextConfig, CACHE_TEXT)}


def normal(dest: str, value):
    if isinstance(value, Path):
        return str(value)
    return value.lower() if dest == "model_version" and isinstance(value, str) else value


def test_every_musubi_option_is_accepted_with_musubi_tuners_value(musubi_parsers, capsys):
    """Each option string of each script, with every choice or a typed sample: flowtuner's parser accepts it
    and reads the same value musubi-tuner's parser reads."""
    checked = 0
    for command, flag, value in musubi_cases(musubi_parsers):
        parser = musubi_parsers[command]
        argv = [*required(parser), flag, *value]
        theirs = parser.parse_args(argv)
        try:
            ours = flowtuner_parse(command, argv)
        except SystemExit:
            pytest.fail(f"flowtuner {command} refused {flag} {' '.join(value)}: {capsys.readouterr().err.strip()}")
        dest = next(a.dest for a in options(parser) if flag in a.option_strings)
        if hasattr(ours, dest):
            assert normal(dest, getattr(ours, dest)) == normal(dest, getattr(theirs, dest)), (command, flag, value)
        checked += 1
    assert checked > 330  # every option of the five scripts (with every choice), not a silently empty list


def test_values_musubi_refuses_by_type_are_refused(musubi_parsers, capsys):
    for command, parser in musubi_parsers.items():
        for action in options(parser):
            bad = "bogus-choice" if action.choices else "abc" if action.type in (int, float) else None
            if bad is None or action.dest in WIDER or getattr(action.type, "__name__", "") == "_int_or_float":
                continue
            with pytest.raises(SystemExit):
                flowtuner_parse(command, [*required(parser), action.option_strings[0], bad])
            capsys.readouterr()
    with pytest.raises(SystemExit):  # musubi-tuner's int, float or N% for step counts
        flowtuner_parse("train", ["--lr_warmup_steps", "ten"])
    args = flowtuner_parse("train", ["--lr_warmup_steps", "5%", "--lr_decay_steps", "1.0"])
    assert (args.lr_warmup_steps, args.lr_decay_steps) == (0.05, 1) and isinstance(args.lr_decay_steps, int)


def test_help_renders_every_option(capsys):
    """A bare % in a help text made argparse print the whole action dict (`~30% slower`)."""
    for command in ("train", "finetune", "cache-latents", "cache-text", "generate", "sigmas", "demo"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        out = capsys.readouterr().out
        assert "option_strings" not in out and "%(" not in out, command
        if command == "train":
            assert "~30% slower" in out and "flowtuner's loader threads persist anyway" in out


def test_ignored_flags_log_one_line_and_aliases_set_options(caplog):
    caplog.set_level(logging.INFO)
    cfg = configure(flowtuner_parse("train", ["--persistent_data_loader_workers", "--xformers", "--compile",
                                              "--use_pinned_memory_for_block_swap", "--guidance_scale", "3.5"]))
    notes = [r.getMessage() for r in caplog.records if r.name == "flowtuner.musubi"]
    assert notes == ["--compile (musubi-tuner): flowtuner runs the DiT eagerly (torch.compile is not wired in yet)",
                     "--persistent_data_loader_workers (musubi-tuner): flowtuner's loader threads persist anyway",
                     "--use_pinned_memory_for_block_swap (musubi-tuner): with --blocks_to_swap on CUDA the host "
                     "copies are always pinned (transfers are asynchronous)",
                     "--guidance_scale (musubi-tuner): embedded guidance is HunyuanVideo's; Qwen-Image has none "
                     "(musubi-tuner ignores it too)"]
    assert cfg.attn_mode == "xformers" and cfg.model_version == "original"


@pytest.mark.parametrize("command,table", [("train", TRAIN), ("generate", GENERATE)])
def test_refused_flags_are_one_line_errors(command, table):
    for name, flag in table.items():
        if not flag.refuse:
            continue
        action = next(a for a in build_parser()._subparsers._group_actions[0].choices[command]._actions if a.dest == name)
        value = [] if action.nargs == 0 else [{int: "1", float: "1.5"}.get(action.type, "x")]
        args = flowtuner_parse(command, [f"--{name}", *value])
        with pytest.raises(ConfigError, match=f"^--{name}: ") as err:
            from flowtuner.config.musubi import apply_musubi_flags

            apply_musubi_flags(args, table)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("argv,version", [
    (["--model_version", "EDIT-2511"], "edit-2511"), (["--edit"], "edit"), (["--edit", "--edit_plus"], "edit-2509"),
    (["--edit_plus", "--model_version", "edit"], "edit"), ([], "original"),
])
def test_model_version_resolves_as_musubi_tuner_does(argv, version):
    assert configure(flowtuner_parse("train", argv)).model_version == version


def test_layered_is_a_one_line_error():
    with pytest.raises(ConfigError) as err:
        configure(flowtuner_parse("train", ["--model_version", "LAYERED"]))
    assert str(err.value).startswith("--model_version layered: Qwen-Image-Layered is not available yet; run")
    assert "\n" not in str(err.value)


def test_layered_is_refused_by_every_command(tmp_path, capsys):
    from flowtuner.cli import main

    dataset = tmp_path / "d.toml"
    dataset.write_text('[general]\nresolution = 64\n[[datasets]]\nimage_directory = "nowhere"\n')
    for command, extra in (("cache-latents", ["--dataset_config", str(dataset)]),
                           ("cache-text", ["--dataset_config", str(dataset)]),
                           ("train", []), ("finetune", []), ("generate", ["--prompt", "x"])):
        assert main([command, *extra, "--model_version", "layered"]) == 2
        err = capsys.readouterr().err.strip()
        assert "Qwen-Image-Layered is not available yet" in err and "\n" not in err, (command, err)


def test_config_file_takes_every_musubi_train_key(musubi_parsers, tmp_path, caplog):
    """A musubi-tuner TOML with every train option (musubi-tuner's parsed value of each sample) is read, and
    the run's config is built from it; the keys whose feature flowtuner refuses are checked above."""
    caplog.set_level(logging.INFO)
    parser = musubi_parsers["train"]
    refused = {name for name, flag in TRAIN.items() if flag.refuse} | {"edit", "edit_plus", "config_file"}
    lines = ["[musubi]"]
    for action in options(parser):
        if action.dest in refused:
            continue
        value = getattr(parser.parse_args([action.option_strings[0], *samples(action)[0]]), action.dest)
        lines.append(f"{action.dest} = {json.dumps(str(value) if isinstance(value, Path) else value)}")
    path = tmp_path / "run.toml"
    path.write_text("\n".join(lines) + "\n")
    values = config_file_values(str(path))
    assert len(values) == len(lines) - 1
    ours = build_parser()
    sub = ours._subparsers._group_actions[0].choices["train"]
    sub.set_defaults(**values)
    cfg = configure(sub.parse_args([]))
    assert cfg.lr_scheduler == "cosine_with_restarts" and cfg.network_args == ["loraplus_lr_ratio=4", "verbose=True"]
    assert cfg.timestep_sampling == "sigma" and cfg.max_data_loader_n_workers == 64
    assert any("persistent_data_loader_workers" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- the documented commands


def documented_commands() -> list[tuple[str, list[str]]]:
    """(flowtuner command, arguments) of every command in the musubi-tuner Qwen-Image document."""
    text = shared_path("seeds/qwen-image-musubi-tuner.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        tokens = [t for t in shlex.split(block.replace("\\\n", " ")) if t != "..."]
        script = next(i for i, t in enumerate(tokens) if t.endswith(".py"))
        out.append((SCRIPTS[Path(tokens[script]).name], tokens[script + 1:]))
    return out


def test_documented_commands_parse_and_configure(caplog):
    caplog.set_level(logging.INFO)
    commands = documented_commands()
    assert sorted({c for c, _ in commands}) == ["cache-latents", "cache-text", "finetune", "generate", "train"]
    assert len(commands) == 7
    for command, argv in commands:
        args = flowtuner_parse(command, argv)
        cfg = CONFIGURE[command](args)
        assert cfg.model_version == ("edit" if "--edit" in argv else "original")
        if command in ("train", "finetune"):
            assert cfg.attn_mode == "torch" and (cfg.sdpa or "--edit" in argv)  # the edit example omits --sdpa
    train = next(argv for command, argv in commands if command == "train" and "--edit" not in argv)
    cfg = configure(flowtuner_parse("train", train))
    assert (cfg.timestep_sampling, cfg.discrete_flow_shift, cfg.learning_rate, cfg.max_data_loader_n_workers) == \
        ("shift", 2.2, 5e-5, 2)
    assert "--persistent_data_loader_workers (musubi-tuner): flowtuner's loader threads persist anyway" in caplog.messages


# ---------------------------------------------------------------- LR schedules


def lrs(schedule, optimizer, steps: int) -> list[float]:
    """Every group's lr before each of `steps` steps, flat."""
    out = []
    for _ in range(steps):
        out += [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        schedule.step()
    return out


def sgd(lr: float = 0.5, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr * (k + 1)} for k in range(groups)]
    return torch.optim.SGD(params, lr=lr)


SCHEDULE_CASES = [
    ("constant", []), ("constant_with_warmup", ["--lr_warmup_steps", "7"]), ("linear", ["--lr_warmup_steps", "0.1"]),
    ("cosine", ["--lr_warmup_steps", "5"]), ("cosine", ["--lr_scheduler_args", "num_cycles=1.5"]),
    ("cosine_with_restarts", ["--lr_warmup_steps", "4", "--lr_scheduler_num_cycles", "3"]),
    ("polynomial", ["--lr_warmup_steps", "3", "--lr_scheduler_power", "2.5"]),
    ("polynomial", ["--lr_scheduler_args", "lr_end=0.01"]),
    ("inverse_sqrt", ["--lr_warmup_steps", "6"]), ("inverse_sqrt", ["--lr_warmup_steps", "6", "--lr_scheduler_timescale", "20"]),
    ("cosine_with_min_lr", ["--lr_warmup_steps", "5", "--lr_scheduler_min_lr_ratio", "0.2"]),
    ("cosine_with_min_lr", ["--lr_scheduler_num_cycles", "3", "--lr_scheduler_args", "min_lr=0.01"]),
    ("warmup_stable_decay", ["--lr_warmup_steps", "10%", "--lr_decay_steps", "0.3", "--lr_scheduler_min_lr_ratio", "0.1"]),
    ("warmup_stable_decay", ["--lr_warmup_steps", "4", "--lr_decay_steps", "20", "--lr_scheduler_args",
                             "warmup_type='1-sqrt'", "decay_type='linear'"]),
    ("piecewise_constant", ["--lr_scheduler_args", "step_rules='1:10,0.1:20,0.01:30,0.005'"]),
    ("rex", ["--lr_warmup_steps", "5", "--lr_scheduler_min_lr_ratio", "0.05"]),
    ("rex", ["--lr_scheduler_args", "rex_alpha=0.2", "rex_beta=0.8"]),
]


@pytest.mark.parametrize("name,flags", SCHEDULE_CASES)
def test_schedules_match_musubi_tuners_get_lr_scheduler(musubi_parsers, name, flags):
    """The same flags through musubi-tuner's parser and get_lr_scheduler (transformers' / diffusers' schedule
    functions, its RexLR) and through flowtuner's: the same lr at each of 60 steps, for two param groups."""
    from musubi_tuner.training.trainer_base import NetworkTrainer

    argv = ["--lr_scheduler", name, "--max_train_steps", "60", "--learning_rate", "0.5", *flags]
    theirs_args = musubi_parsers["train"].parse_args(argv)
    trainer = NetworkTrainer.__new__(NetworkTrainer)
    theirs_opt = sgd(groups=1 if name == "rex" else 2)  # musubi-tuner's RexLR sets every group to one lr
    theirs = lrs(trainer.get_lr_scheduler(theirs_args, theirs_opt, 1), theirs_opt, 60)
    cfg = configure(flowtuner_parse("train", argv))
    ours_opt = sgd(groups=len(theirs_opt.param_groups))
    ours = lrs(make_schedule(cfg.lr_scheduler, ours_opt, cfg.max_train_steps, cfg.schedule_options()), ours_opt, 60)
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)
    assert len({round(v, 12) for v in ours[::len(ours_opt.param_groups)]}) >= {"constant": 1, "piecewise_constant": 4}.get(name, 6)


def test_schedules_match_diffusers_get_scheduler():
    """diffusers' own entry point for the names it has (num_cycles / power as its keywords)."""
    from diffusers.optimization import get_scheduler

    for name, kwargs, opts in (("linear", {"num_warmup_steps": 4}, ScheduleOptions(warmup=4)),
                               ("cosine_with_restarts", {"num_warmup_steps": 2, "num_cycles": 2},
                                ScheduleOptions(warmup=2, num_cycles=2)),
                               ("polynomial", {"num_warmup_steps": 0, "power": 3.0}, ScheduleOptions(power=3.0)),
                               ("piecewise_constant", {"step_rules": "1:5,0.5:9,0.2"},
                                ScheduleOptions(args={"step_rules": "1:5,0.5:9,0.2"}))):
        theirs_opt, ours_opt = sgd(), sgd()
        extra = {"num_training_steps": 30} if "step_rules" not in kwargs else {}
        theirs = lrs(get_scheduler(name, theirs_opt, **kwargs, **extra), theirs_opt, 30)
        assert lrs(make_schedule(name, ours_opt, 30, opts), ours_opt, 30) == pytest.approx(theirs, rel=1e-9), name


def test_every_registered_schedule_is_covered_and_refusals_are_one_line():
    assert {n for n, _ in SCHEDULE_CASES} | {"cosine_warmup_with_min_lr"} == set(SCHEDULES)
    for name in REFUSED:
        with pytest.raises(ConfigError, match=f"--lr_scheduler {name}: not available: "):
            make_schedule(name, sgd(), 10)
    with pytest.raises(ConfigError, match="not a parameter of cosine; it takes num_cycles"):
        make_schedule("cosine", sgd(), 10, ScheduleOptions(args={"power": 2}))
    with pytest.raises(ConfigError, match="--lr_warmup_steps has no effect with --lr_scheduler constant; use constant_with_warmup"):
        make_schedule("constant", sgd(), 10, ScheduleOptions(warmup=2))


def test_cosine_warmup_with_min_lr_matches_transformers():
    """musubi-tuner lists it but fails to call it (it passes num_decay_steps); flowtuner takes the same flags as
    cosine_with_min_lr."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup_lr_rate

    theirs_opt, ours_opt = sgd(), sgd()
    theirs = get_cosine_with_min_lr_schedule_with_warmup_lr_rate(theirs_opt, 5, 40, num_cycles=0.5, min_lr_rate=0.1)
    ours = make_schedule("cosine_warmup_with_min_lr", ours_opt, 40, ScheduleOptions(warmup=5, min_lr_ratio=0.1))
    assert lrs(ours, ours_opt, 40) == pytest.approx(lrs(theirs, theirs_opt, 40), rel=1e-9)


def test_lr_scheduler_type_builds_a_class_with_its_args():
    opt = sgd()
    sched = make_schedule("constant", opt, 10, ScheduleOptions(kind="StepLR", args={"step_size": 3, "gamma": 0.5}))
    assert lrs(sched, opt, 7) == [0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125]
    opt = sgd()
    sched = make_schedule("constant", opt, 10, ScheduleOptions(kind="torch.optim.lr_scheduler.ExponentialLR", args={"gamma": 0.9}))
    assert lrs(sched, opt, 3)[2] == pytest.approx(0.5 * 0.81)
    with pytest.raises(ConfigError, match="--lr_scheduler_type NoSuch: cannot import it"):
        make_schedule("constant", sgd(), 10, ScheduleOptions(kind="NoSuch"))
    with pytest.raises(ConfigError, match="--lr_scheduler_type StepLR with --lr_scheduler_args"):
        make_schedule("constant", sgd(), 10, ScheduleOptions(kind="StepLR", args={"gamma": 0.5}))


def test_docs_list_every_flag_sampler_and_schedule():
    from flowtuner.flow.timesteps import SAMPLERS

    docs = (Path(__file__).parents[1] / "docs/training.md").read_text(encoding="utf-8")
    for table in (TRAIN, CACHE_LATENTS, CACHE_TEXT, GENERATE):
        for name, flag in table.items():
            note = flag.note.replace("|", "\\|")
            assert any(line.startswith(f"| `--{name}` |") and note in line for line in docs.splitlines()), name
    for name in [*SAMPLERS, *SCHEDULES, *REFUSED]:
        assert f"`{name}`" in docs, name
