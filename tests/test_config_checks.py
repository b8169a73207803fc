"""Config checks at load: numeric ranges, YAML syntax errors with file and line, and absolute paths."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

import pytest
import yaml

from mmpost.cli import main
from mmpost.config import ConfigError, dump_config, load_config, to_dict
from mmpost.config.loader import describe, read_yaml
from mmpost.config.schema import RunConfig
from mmpost.quant import QuantizeOptions, load_options


def write(folder: Path, data: dict, name: str = "cfg.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


# (--set item, the message load_config must give): one value just outside each declared range.
BAD_VALUES = [
    ("model.lora.r=-2", "model.lora.r: must be >= 0, got -2"),
    ("model.lora.alpha=0", "model.lora.alpha: must be > 0, got 0"),
    ("model.lora.dropout=1.0", "model.lora.dropout: must be in [0, 1), got 1.0"),
    ("model.lora.dropout=-0.1", "model.lora.dropout: must be in [0, 1), got -0.1"),
    ("data.train.max_samples=-1", "data.train.max_samples: must be >= 0, got -1"),
    ("data.eval.max_samples=-1", "data.eval.max_samples: must be >= 0, got -1"),
    ("data.max_length=1", "data.max_length: must be >= 2, got 1"),
    ("data.num_workers=-1", "data.num_workers: must be >= 0, got -1"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction: must be in [0, 1], got 1.5"),
    ("train.lr=-0.5", "train.lr: must be > 0, got -0.5"),
    ("train.lr=0", "train.lr: must be > 0, got 0.0"),
    ("train.part_lr={llm: 0}", "train.part_lr.llm: must be > 0, got 0.0"),
    ("train.part_lr={connectors: 1e-3, llm: -2e-5}", "train.part_lr.llm: must be > 0, got -2e-05"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0, got -0.1"),
    ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
    ("train.grad_accum=0", "train.grad_accum: must be >= 1, got 0"),
    ("train.max_steps=-5", "train.max_steps: must be >= 0, got -5"),
    ("train.epochs=0", "train.epochs: must be > 0, got 0.0"),
    ("train.warmup_ratio=2.0", "train.warmup_ratio: must be in [0, 1], got 2.0"),
    ("train.max_grad_norm=-1", "train.max_grad_norm: must be >= 0, got -1.0"),
    ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
    ("train.save_every=-1", "train.save_every: must be >= 0, got -1"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints: must be >= 0, got -1"),
    ("train.eval_every=-1", "train.eval_every: must be >= 0, got -1"),
    ("eval.max_samples=0", "eval.max_samples: must be >= 1, got 0"),
    ("eval.batch_size=0", "eval.batch_size: must be >= 1, got 0"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens: must be >= 1, got 0"),
    ("seed=-1", "seed: must be in [0, 4294967295], got -1"),
    (f"seed={2**32}", "seed: must be in [0, 4294967295], got 4294967296"),
]


@pytest.fixture
def base_config(tmp_path) -> Path:
    return write(tmp_path, {"stage": "sft"})


@pytest.mark.parametrize(("item", "message"), BAD_VALUES, ids=[item for item, _ in BAD_VALUES])
def test_out_of_range_value_fails_at_load(base_config, item, message):
    with pytest.raises(ConfigError) as err:
        load_config(base_config, [item])
    assert message in str(err.value)


@pytest.mark.parametrize(("item", "message"), BAD_VALUES, ids=[item for item, _ in BAD_VALUES])
def test_out_of_range_value_is_a_cli_error(base_config, item, message, capsys):
    assert main(["config", "show", str(base_config), "--set", item]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmpost: error:") and message.partition(":")[0] + ":" in err


def test_values_on_the_bounds_load(base_config):
    cfg = load_config(
        base_config,
        [
            "model.lora.r=0",
            "model.lora.dropout=0",
            "train.warmup_ratio=1",
            "train.max_grad_norm=0",
            "seed=4294967295",
            "train.keep_checkpoints=0",
            "data.max_bad_fraction=0",
            "train.max_steps=0",
            "data.max_length=2",
        ],
    )
    assert (cfg.seed, cfg.train.keep_checkpoints, cfg.train.warmup_ratio) == (4294967295, 0, 1.0)


QUANT_BAD_VALUES = [
    ({"group_size": 0}, "group_size: must be >= 1, got 0"),
    ({"num_samples": 0}, "num_samples: must be >= 1, got 0"),
    ({"batch_size": 0}, "batch_size: must be >= 1, got 0"),
    ({"max_length": 1}, "max_length: must be >= 2, got 1"),
    ({"dampening": 0}, "dampening: must be > 0, got 0.0"),
    ({"block_size": 0}, "block_size: must be >= 1, got 0"),
    ({"calib": {"max_samples": -1}}, "calib.max_samples: must be >= 0, got -1"),
]


@pytest.mark.parametrize(("data", "message"), QUANT_BAD_VALUES, ids=[m.partition(":")[0] for _, m in QUANT_BAD_VALUES])
def test_out_of_range_quantize_option_fails(tmp_path, data, message):
    with pytest.raises(ConfigError) as err:
        load_options(str(write(tmp_path, data, "quant.yaml")))
    assert message in str(err.value)
    assert load_options(str(write(tmp_path, {"group_size": None}, "ok.yaml"))).group_size is None  # per channel


def _numeric(tp: Any) -> bool:
    """True for int / float keys, optional ones and mappings of numbers (not Literal choices)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_numeric(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is dict:
        return _numeric(typing.get_args(tp)[1])
    return tp in (int, float)


def _numeric_keys(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    keys = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key, tp = prefix + field.name.rstrip("_"), hints[field.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or inner:
            keys |= _numeric_keys(tp if dataclasses.is_dataclass(tp) else inner[0], key + ".")
        elif _numeric(tp):
            keys[key] = field
    return keys


@pytest.mark.parametrize("cls", [RunConfig, QuantizeOptions], ids=lambda c: c.__name__)
def test_describe_shows_every_numeric_range(cls):
    keys = _numeric_keys(cls)
    assert {"train.batch_size", "train.part_lr", "seed", "data.eval.max_samples"} <= set(keys) or cls is not RunConfig
    shown = {line.split(" [", 1)[0]: line.split("\n", 1)[0] for line in describe(cls)}
    for key, field in keys.items():
        assert "range" in field.metadata, f"{key} declares no range"
        assert str(field.metadata["range"]) in shown[key], f"{key}: {shown[key]}"
    if cls is RunConfig:
        assert shown["train.batch_size"] == "train.batch_size [int >= 1] = 8"
        assert shown["model.lora.dropout"] == "model.lora.dropout [float in [0, 1)] = 0.05"
        assert "values > 0" in shown["train.part_lr"]
        assert "0 keeps all" in "\n".join(describe(cls))


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("stage: sft\ntrain:\n  lr: 1\n  batch_size: 8: 3\n")
    with pytest.raises(ConfigError) as err:
        read_yaml(path)
    assert str(err.value) == f"{path}: line 4, column 16: mapping values are not allowed here"
    with pytest.raises(ConfigError, match="line 4, column 16"):
        load_config(path)
    assert main(["config", "show", str(path)]) == 2
    assert f"mmpost: error: {path}: line 4" in capsys.readouterr().err


def test_bad_yaml_in_an_override_names_the_item(base_config):
    with pytest.raises(ConfigError) as err:
        load_config(base_config, ["train.part_lr={llm: 1e-5"])
    message = str(err.value)
    assert message.startswith("--set 'train.part_lr={llm: 1e-5': ") and "expected ',' or '}'" in message
    assert "<unicode string>" not in message


def _project(root: Path) -> dict[str, Path]:
    """A project folder with the files a run config names."""
    files = {
        "train": root / "data" / "train.jsonl",
        "eval": root / "data" / "eval.jsonl",
        "images": root / "data" / "images",
        "llm": root / "models" / "llm",
        "template": root / "models" / "chat.jinja",
        "clip": root / "models" / "clip",
        "qformer": root / "models" / "qformer",
        "teacher": root / "runs" / "teacher",
        "from": root / "runs" / "align",
    }
    for name, path in files.items():
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n" if name != "template" else "{{ messages }}")
        else:
            path.mkdir(parents=True, exist_ok=True)
    return files


def test_relative_paths_become_absolute_and_survive_a_dump(tmp_path, monkeypatch):
    project = tmp_path / "project"
    files = _project(project)
    config = {
        "stage": {"name": "distill", "teacher": "runs/teacher"},
        "out": "runs/student",  # not written yet: still made absolute
        "from": "./runs/align",
        "model": {
            "llm": {"path": "models/llm", "chat_template": "models/chat.jinja"},
            "encoders": {"image": {"name": "hf_vision", "path": "models/clip"}},
            "connectors": {"image": {"name": "qformer", "path": "models/qformer"}},
        },
        "data": {
            "train": {"path": "data/train.jsonl", "image_root": "data/images"},
            "eval": {"path": "data/../data/eval.jsonl", "image_root": "data/images"},
        },
    }
    write(project / "configs", config, "run.yaml")
    monkeypatch.chdir(project)
    cfg = load_config("configs/run.yaml")
    resolved = {
        "train": cfg.data.train.path,
        "eval": cfg.data.eval.path,
        "images": cfg.data.eval.image_root,
        "llm": cfg.model.llm.path,
        "template": cfg.model.llm.chat_template,
        "clip": cfg.model.encoders["image"]["path"],
        "qformer": cfg.model.connectors["image"]["path"],
        "teacher": cfg.stage.teacher,
        "from": cfg.from_,
    }
    assert resolved == {name: str(path) for name, path in files.items()}
    assert cfg.data.train.image_root == str(files["images"]) and cfg.out == str(project / "runs" / "student")

    run_dir = project / "runs" / "student"
    run_dir.mkdir()
    dump_config(cfg, run_dir / "config.yaml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = load_config(os.path.relpath(run_dir / "config.yaml"))
    assert again == cfg and to_dict(again) == to_dict(cfg)


def test_hub_ids_pkg_paths_urls_and_template_text_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = {
        "stage": {"name": "distill", "teacher": "runs/not-yet"},
        "from": "runs/missing",
        "model": {
            "llm": {"path": "Qwen/Qwen2.5-0.5B-Instruct", "chat_template": template},
            "encoders": {
                "image": {"name": "hf_vision", "path": "openai/clip-vit-large-patch14"},
                "audio": {"name": "wav2vec2", "arch": "wav2vec2_base", "path": "pkg:some_weights/w.safetensors"},
            },
        },
        "data": {"train": {"path": "https://example.org/shards/sft-{000000..000009}.tar"}},
    }
    cfg = load_config(write(tmp_path, config))
    assert cfg.model.llm.path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.model.llm.chat_template == template
    assert cfg.model.encoders["image"]["path"] == "openai/clip-vit-large-patch14"
    assert cfg.model.encoders["audio"]["path"] == "pkg:some_weights/w.safetensors"
    assert cfg.data.train.path == config["data"]["train"]["path"]
    # names that do not exist (yet) are kept as written, so their errors later quote what the user wrote
    assert (cfg.stage.teacher, cfg.from_) == ("runs/not-yet", "runs/missing")
    # a local shard pattern is a path even though the pattern itself names no file
    cfg = load_config(None, ["stage=sft", "data.train.path=shards/sft-{000000..000009}.tar"])
    assert cfg.data.train.path == str(tmp_path / "shards" / "sft-{000000..000009}.tar")


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "llm").mkdir(parents=True)
    cfg = load_config(None, ["stage=sft", "out=~/runs/x", "model.llm.path=~/llm", "data.train.image_root=~/img"])
    home = tmp_path / "home"
    assert (cfg.out, cfg.model.llm.path, cfg.data.train.image_root) == (
        str(home / "runs" / "x"),
        str(home / "llm"),
        str(home / "img"),
    )
