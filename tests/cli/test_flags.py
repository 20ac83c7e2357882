"""`petvit train`'s flags come from the config dataclasses' field metadata (cli/flags.py): every documented field is
a flag, parsing gives the field its value back, and the flag set is the one the command has always had."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest

from cli.flags import add_flags, flag_fields, flag_values, option_string
from cli.train import add_arguments, configs_from_args
from training.data import DataConfig
from training.loop import RunConfig
from training.recipes import TrainConfig

CONFIGS = (TrainConfig, DataConfig, RunConfig)
# `petvit train`'s flags before they were derived from the dataclasses: none may go missing or appear unasked.
TRAIN_FLAGS = {
    "--recipe", "--dataset", "--data-dir", "--out", "--if-missing", "--device", "--dtype", "--variant", "--epochs",
    "--batch-size", "--lr", "--weight-decay", "--warmup-epochs", "--label-smoothing", "--augment", "--mixup",
    "--no-mixup", "--hflip", "--no-hflip", "--min-crop-scale", "--seed", "--split-seed", "--val-fraction",
    "--test-fraction", "--set", "--teacher", "--distill", "--distill-tau", "--distill-alpha", "--arch", "--init",
    "--output-dir", "--resume", "--stop-after", "--workers", "--threads", "--no-download", "--no-evaluate",
    "--cache-images",
}  # fmt: skip


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="petvit train")
    add_arguments(parser)
    return parser


def sample(f: dataclasses.Field[Any]) -> tuple[Any, list[str]]:
    """A value for the field that is not its default, and the argv that asks for it."""
    flag, default = option_string(f), f.default
    if isinstance(default, bool):
        if f.metadata.get("negatable"):
            return not default, ["--" + ("no-" if default else "") + f.name.replace("_", "-")]
        return not default, [flag]  # a plain switch: --resume sets True, --no-download sets False
    if f.default_factory is not dataclasses.MISSING:  # the one dict field, --set KEY=VALUE
        return {"depth": 6, "act": "gelu"}, [flag, "depth=6", flag, "act=gelu"]
    if "choices" in f.metadata:
        value = next(c for c in reversed(f.metadata["choices"]) if c != default)
        return value, [flag, value]
    # The annotation, not the default, says int: --workers is `int | None = None`.
    value = {"int": 7, "float": 0.375}.get(str(f.type).removesuffix(" | None"), "sample/value")
    return value, [flag, str(value)]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda cls: cls.__name__)
def test_every_documented_field_is_a_flag_that_round_trips(cls: type) -> None:
    fields = flag_fields(cls)
    assert fields, f"{cls.__name__} declares no flags"
    dests = {action.dest for action in train_parser()._actions}
    assert {f.name for f in fields} <= dests
    for f in fields:
        value, argv = sample(f)
        assert flag_values(train_parser().parse_args(argv), cls)[f.name] == value, (f.name, argv)


def test_the_flag_set_is_the_commands_own() -> None:
    flags = {s for action in train_parser()._actions for s in action.option_strings} - {"-h", "--help"}
    assert flags == TRAIN_FLAGS


def test_no_flags_give_the_dataclass_and_recipe_defaults(tmp_path) -> None:
    args = train_parser().parse_args([])
    assert DataConfig(**flag_values(args, DataConfig)) == DataConfig()
    assert flag_values(args, RunConfig) == {**dataclasses.asdict(RunConfig()), "output_dir": None}
    given = flag_values(args, TrainConfig)
    assert given.pop("recipe") == "auto" and given.pop("seed") == 0
    assert set(given.values()) == {None}  # unset: recipe_config keeps the recipe's own
    out = tmp_path / "models" / "pets-v2.safetensors"
    cfg, data, run = configs_from_args(
        train_parser().parse_args(["--device", "cpu", "--recipe", "scratch", "--out", str(out), "--no-download"])
    )
    assert cfg == TrainConfig(**{**dataclasses.asdict(cfg), "recipe": "scratch"})  # the recipe's, untouched
    assert (cfg.epochs, cfg.lr, cfg.mixup, cfg.model_overrides) == (100, 1e-3, True, {})
    assert data == DataConfig(download=False)
    assert run == RunConfig(out=str(out), output_dir=str(tmp_path / "models" / "runs" / "pets-v2"), device="cpu")


def test_set_reads_json_values_and_a_later_key_wins(capsys) -> None:
    argv = ["--set", "depth=6", "--set", "act=gelu", "--set", "depth=4", "--set", "qkv_bias=false"]
    assert flag_values(train_parser().parse_args(argv), TrainConfig)["model_overrides"] == {
        "depth": 4,
        "act": "gelu",
        "qkv_bias": False,
    }
    with pytest.raises(SystemExit) as exit_info:
        train_parser().parse_args(["--set", "depth"])
    assert exit_info.value.code == 2
    assert "argument --set: expects KEY=VALUE, got 'depth'" in capsys.readouterr().err


def test_a_misspelt_metadata_key_is_refused() -> None:
    @dataclasses.dataclass
    class Settings:
        size: int = dataclasses.field(default=3, metadata={"help": "how big", "choice": (3, 4)})

    with pytest.raises(TypeError, match=r"Settings.size: unknown flag metadata \['choice'\]"):
        add_flags(argparse.ArgumentParser(), Settings)


def test_bad_values_are_argparse_errors(capsys) -> None:
    for argv, message in [
        (["--epochs", "ten"], "argument --epochs: invalid int value: 'ten'"),
        (["--augment", "heavy"], "argument --augment: invalid choice: 'heavy'"),
        (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    ]:
        with pytest.raises(SystemExit):
            train_parser().parse_args(argv)
        assert message in capsys.readouterr().err
