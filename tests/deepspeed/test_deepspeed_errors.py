"""DeepSpeedStrategy's arguments, config and precisions in one process: what is built, and what is refused early."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from torchloom.core.connector import Connector
from torchloom.core.errors import ConfigurationError
from torchloom.core.precision.deepspeed import DeepSpeedPrecision
from torchloom.core.registry import STRATEGIES
from torchloom.core.strategies import deepspeed_config
from torchloom.core.strategies.deepspeed import DeepSpeedStrategy

pytest.importorskip("deepspeed")


@pytest.mark.parametrize(
    ("name", "stage", "offload_optimizer", "offload_parameters"),
    [
        ("deepspeed", 2, False, False),
        ("deepspeed_stage_1", 1, False, False),
        ("deepspeed_stage_2", 2, False, False),
        ("deepspeed_stage_2_offload", 2, True, False),
        ("deepspeed_stage_3", 3, False, False),
        ("deepspeed_stage_3_offload", 3, True, True),
    ],
)
def test_registered_names_build_the_stage_and_offload_they_say(
    name: str, stage: int, offload_optimizer: bool, offload_parameters: bool
) -> None:
    strategy = STRATEGIES.get(name)
    assert isinstance(strategy, DeepSpeedStrategy) and strategy.stage == stage
    zero = strategy.config["zero_optimization"]
    assert ("offload_optimizer" in zero) is offload_optimizer
    assert ("offload_param" in zero) is offload_parameters
    assert strategy.initializes_empty_modules is (stage == 3)  # zero.Init for configure_model / init_module


def test_the_generated_config_uses_the_users_optimizer_and_the_products_loop() -> None:
    strategy = DeepSpeedStrategy(stage=2, offload_optimizer=True)
    strategy.configure_loop(micro_batch_size=8, accumulation_steps=4, gradient_clip_val=0.5)
    config = strategy.config
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 8 * 4 * strategy.world_size
    assert config["gradient_clipping"] == 0.5 and strategy.clips_gradients_in_step
    assert config["zero_force_ds_cpu_optimizer"] is False  # a torch optimizer with offload: no cpu_adam build
    assert "optimizer" not in config and deepspeed_config.ops_built_on_first_use(config) == []


def test_a_user_config_is_merged_over_the_generated_one(tmp_path: Path) -> None:
    user = {"zero_optimization": {"reduce_bucket_size": 1000}, "gradient_clipping": 2.0}
    from_dict = DeepSpeedStrategy(stage=3, config=user).config
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    from_file = DeepSpeedStrategy(stage=3, config=path).config
    for config in (from_dict, from_file):
        assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}  # merged, not replaced
        assert config["gradient_clipping"] == 2.0


def test_a_users_global_batch_size_replaces_the_generated_micro_batch_size() -> None:
    config = DeepSpeedStrategy(config={"train_batch_size": 64}).config
    assert config["train_batch_size"] == 64 and "train_micro_batch_size_per_gpu" not in config


def test_precision_sections_go_into_the_config() -> None:
    strategy = DeepSpeedStrategy()
    strategy.precision = DeepSpeedPrecision("bf16-mixed")
    assert strategy.config["bf16"] == {"enabled": True}
    strategy.precision = DeepSpeedPrecision("16-mixed", device_type="cuda")
    assert strategy.config["fp16"]["enabled"] is True and strategy.config["fp16"]["loss_scale"] == 0


def test_fp16_on_the_cpu_is_refused_by_the_connector_before_any_process_starts() -> None:
    connector = Connector(accelerator="cpu", devices=2, strategy="deepspeed", precision="16-mixed")
    with pytest.raises(ConfigurationError, match=r"'16-mixed'.*not supported on the CPU.*'bf16-mixed'"):
        connector.resolve()


def test_a_precision_deepspeed_cannot_run_is_refused_listing_the_valid_ones() -> None:
    connector = Connector(accelerator="cpu", devices=2, strategy="deepspeed_stage_3", precision="64-true")
    with pytest.raises(ConfigurationError, match=r"'64-true' is not supported by DeepSpeed. Valid: '32-true'"):
        connector.resolve()


def test_a_config_file_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"no such file"):
        DeepSpeedStrategy(config=tmp_path / "missing.json")


@pytest.mark.parametrize(("text", "message"), [("{stage: 2", "is not valid JSON"), ("[1, 2]", "JSON list")])
def test_a_config_file_that_is_not_a_json_object_is_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigurationError, match=message):
        DeepSpeedStrategy(config=path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stage": 4}, r"stage=4 is not valid. Valid: 1, 2, 3"),
        ({"stage": 2, "offload_parameters": True}, r"offload_parameters=True needs ZeRO stage 3"),
        ({"stage": 1, "zero_init": True}, r"zero_init=True needs ZeRO stage 3"),
        ({"gradient_clipping": -1.0}, r"gradient_clipping=-1.0 is not valid"),
        ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps=0 is not valid"),
        ({"config": 3}, r"config=3 is not valid"),
    ],
)
def test_bad_arguments_are_refused_naming_the_value(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        DeepSpeedStrategy(**kwargs)  # type: ignore[arg-type]


def test_clipping_by_value_or_by_hand_is_refused_with_where_to_set_it() -> None:
    strategy = DeepSpeedStrategy()
    with pytest.raises(ConfigurationError, match=r"gradient_clip_algorithm='value' is not supported by DeepSpeed"):
        strategy.configure_loop(gradient_clip_val=1.0, gradient_clip_algorithm="value")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigurationError, match=r"DeepSpeedStrategy\(gradient_clipping=1.0\)"):
        strategy.clip_gradients_norm(model, optimizer, 1.0)
    with pytest.raises(ConfigurationError, match=r"given twice"):
        DeepSpeedStrategy(gradient_clipping=0.5).configure_loop(gradient_clip_val=1.0)


def test_a_config_optimizer_announces_the_op_deepspeed_will_compile(caplog: pytest.LogCaptureFixture) -> None:
    adam = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    offload = {**adam, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    assert deepspeed_config.ops_built_on_first_use(adam) == ["fused_adam"]
    assert deepspeed_config.ops_built_on_first_use(offload) == ["cpu_adam"]
    assert (
        deepspeed_config.ops_built_on_first_use({"optimizer": {"type": "Adam", "params": {"torch_adam": True}}}) == []
    )
    with caplog.at_level(logging.WARNING):
        deepspeed_config.announce_op_builds(offload)
    assert "builds its C++ op 'cpu_adam' with g++ on first use" in caplog.text


def test_the_cpu_shm_op_is_skipped_only_while_deepspeed_starts_on_the_cpu() -> None:
    import deepspeed.comm.torch  # noqa: F401

    module = sys.modules["deepspeed.comm.torch"]
    original = module.build_shm_op
    with deepspeed_config.without_cpu_shm_op(True):
        assert module.build_shm_op() is None
    assert module.build_shm_op is original
    with deepspeed_config.without_cpu_shm_op(False):
        assert module.build_shm_op is original
