"""Config loading: strict keys and types with dotted paths, overrides, registries, documentation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmpost.config import ConfigError, load_config
from mmpost.config.loader import describe, describe_registry
from mmpost.config.schema import RunConfig
from mmpost.registry import Registry, RegistryError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_names_path_and_nearest(tmp_path):
    path = write(tmp_path, {"stage": "sft", "train": {"lerning_rate": 1e-4}})
    with pytest.raises(ConfigError, match=r"train\.lerning_rate: unknown key.*"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"did you mean 'batch_size'"):
        load_config(write(tmp_path, {"stage": "sft", "train": {"batch_sise": 4}}))


def test_wrong_type_names_path_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected an integer, got 'four'"):
        load_config(write(tmp_path, {"stage": "sft", "train": {"batch_size": "four"}}))
    with pytest.raises(ConfigError, match=r"train\.precision: expected one of 'fp32' \| 'bf16' \| 'fp16'"):
        load_config(write(tmp_path, {"stage": "sft", "train": {"precision": "fp64"}}))
    with pytest.raises(ConfigError, match=r"data\.train\.path: expected a string"):
        load_config(write(tmp_path, {"stage": "sft", "data": {"train": {"path": 3}}}))


def test_booleans_are_strict_and_overrides_apply(tmp_path):
    path = write(tmp_path, {"stage": "sft", "train": {"gradient_checkpointing": True}})
    cfg = load_config(path, ["train.gradient_checkpointing=False", "train.lr=2e-5", "train.part_lr={connectors: 1e-3}"])
    assert cfg.train.gradient_checkpointing is False
    assert cfg.train.lr == pytest.approx(2e-5)  # YAML 1.1 reads 2e-5 as a string; float fields accept it
    assert cfg.train.part_lr == {"connectors": 1e-3}
    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing: expected true or false, got 0"):
        load_config(path, ["train.gradient_checkpointing=0"])
    with pytest.raises(ConfigError, match=r"expected key=value"):
        load_config(path, ["train.lr"])


def test_from_key_and_missing_stage(tmp_path):
    cfg = load_config(write(tmp_path, {"stage": "sft", "from": "runs/align"}))
    assert cfg.from_ == "runs/align"
    with pytest.raises(ConfigError, match=r"stage: required key is missing"):
        load_config(write(tmp_path, {"out": "x"}))


def test_registered_parts_are_checked_against_their_constructor(tmp_path):
    base = {"stage": "sft"}
    with pytest.raises(ConfigError, match=r"model\.connectors\.image\.name: unknown connector 'mpl'.*'mlp'.*linear"):
        load_config(write(tmp_path, base | {"model": {"connectors": {"image": {"name": "mpl"}}}}))
    with pytest.raises(ConfigError, match=r"model\.encoders\.audio\.name: unknown encoder 'wisper'") as error:
        load_config(write(tmp_path, base | {"model": {"encoders": {"audio": {"name": "wisper"}}}}))
    registered = str(error.value).split("Registered: ")[1].split(", ")
    assert {"hf_vision", "hubert", "open_clip", "timm", "wav2vec2", "whisper"} <= set(registered)
    assert registered == sorted(registered)
    with pytest.raises(ConfigError, match=r"unknown connector 'perceiver'.*Registered: ") as error:
        load_config(write(tmp_path, base | {"model": {"connectors": {"audio": {"name": "perceiver"}}}}))
    registered = str(error.value).split("Registered: ")[1].split(", ")
    assert {"linear", "mlp", "qformer", "resampler", "xattn"} <= set(registered)
    with pytest.raises(ConfigError, match=r"model\.connectors\.image\.dept: unknown key for connector 'mlp'.*'depth'"):
        load_config(write(tmp_path, base | {"model": {"connectors": {"image": {"name": "mlp", "dept": 2}}}}))
    with pytest.raises(ConfigError, match=r"model\.connectors\.image\.depth: expected an integer"):
        load_config(write(tmp_path, base | {"model": {"connectors": {"image": {"name": "mlp", "depth": "2"}}}}))
    with pytest.raises(ConfigError, match=r"model\.encoders\.image: encoder 'timm' needs model"):
        load_config(write(tmp_path, base | {"model": {"encoders": {"image": {"name": "timm"}}}}))
    stages = "align, distill, dpo, grpo, ppo, rloo, rm, sft"
    with pytest.raises(ConfigError, match=rf"stage\.name: unknown stage 'sfft'.*{stages}"):
        load_config(write(tmp_path, {"stage": "sfft"}))
    cfg = load_config(write(tmp_path, base | {"model": {"connectors": {"image": "linear"}}}))
    assert cfg.model.connectors["image"] == {"name": "linear"}


def test_registry_rejects_duplicates_and_lists_names():
    registry = Registry("widget")
    registry.add("a", "mmpost.registry:Registry")
    with pytest.raises(RegistryError, match="registered twice"):
        registry.add("a", "mmpost.registry:RegistryError")
    with pytest.raises(RegistryError, match=r"unknown widget 'b'.*Registered: a"):
        registry.get("b")
    assert registry.name_of(Registry) == "a"


def test_every_key_is_documented():
    lines = describe(RunConfig)
    assert not [line for line in lines if "undocumented" in line]
    text = "\n".join(lines)
    for key in ("train.lr", "train.part_lr", "data.max_bad_fraction", "model.lora.r", "from ", "eval.max_new_tokens"):
        assert key in text
    for registry in ("encoders", "connectors", "stages"):
        for line in describe_registry(registry):
            if line.startswith("    "):  # an argument line: "name [type] = default: doc"
                assert not line.rstrip().endswith(":"), f"undocumented argument: {line}"


RUN_CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not {"accelerate", "quant"} & set(p.parts))
LAUNCH_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
QUANT_CONFIGS = sorted((ROOT / "configs" / "quant").glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_run_config_parses(path):
    cfg = load_config(path)
    assert cfg.stage.name in ("align", "sft", "dpo", "grpo", "rloo", "distill", "rm", "ppo")


@pytest.mark.parametrize("path", QUANT_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_quantize_config_parses(path):
    from mmpost.quant import load_options

    assert load_options(str(path)).bits in (4, 8)


@pytest.mark.parametrize("path", LAUNCH_CONFIGS, ids=lambda p: p.name)
def test_accelerate_launch_configs_name_a_distributed_type(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED") and data["num_processes"] >= 1
