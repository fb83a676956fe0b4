"""The training recipe: one field table behind the simulate flags and both TOML tables."""

from __future__ import annotations

import argparse
import math

import pytest

from fl_core.recipe import (
    EMBEDDED,
    FIELDS,
    PRETRAINED,
    SCAFFOLD_SGD_LR,
    STRATEGY_DEFAULTS,
    Recipe,
    RecipeError,
    add_arguments,
    defaults_for,
    fields_for,
    overrides_from_args,
    overrides_from_mapping,
    resolve,
)


def parse(*argv: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return overrides_from_args(parser.parse_args(list(argv)))


def test_defaults_depend_on_the_base() -> None:
    assert defaults_for("embedded") is EMBEDDED and defaults_for("pretrained") is PRETRAINED
    assert EMBEDDED.lr == 1e-2 and PRETRAINED.lr == 1e-3
    assert EMBEDDED.lora_targets == PRETRAINED.lora_targets == ("all-linear",)
    # DPO: chosen per base (see EMBEDDED's note); a user's value still wins.
    assert (EMBEDDED.dpo_lr, EMBEDDED.dpo_beta) == (3e-4, 0.5)
    assert (PRETRAINED.dpo_lr, PRETRAINED.dpo_beta) == (1e-4, 0.1)
    assert resolve("embedded", {"dpo_beta": 0.1}).recipe.dpo_beta == 0.1


def test_flags_give_checked_overrides_and_only_what_was_set() -> None:
    assert parse() == {}
    got = parse(
        "--lora-rank", "16", "--lora-targets", "q_proj, v_proj", "--lr", "3e-4",
        "--local-epochs", "2", "--strategy", "fedadam", "--strategy-param", "eta=0.01",
        "--strategy-param", "tau=1e-3", "--threads", "none", "--lora-head", "yes",
    )  # fmt: skip
    assert got == {
        "lora_rank": 16,
        "lora_targets": ("q_proj", "v_proj"),
        "lr": 3e-4,
        "local_epochs": 2,
        "strategy": "fedadam",
        "strategy_params": (("eta", 0.01), ("tau", 1e-3)),
        "threads": None,
        "lora_head": "yes",
    }
    recipe = PRETRAINED.with_overrides(got)
    assert recipe.local_steps is None and recipe.local_epochs == 2
    assert recipe.params() == {"eta": 0.01, "tau": 1e-3}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lora-rank", "0"], "--lora-rank: lora_rank must be >= 1, got 0"),
        (["--lora-rank", "2.5"], "--lora-rank: lora_rank must be an integer"),
        (["--lr", "-1"], "--lr: lr must be > 0"),
        (["--lr", "nan"], "--lr: lr must be finite"),
        (["--device", "tpu"], "--device: device must be one of auto, cpu, cuda, mps"),
        (["--strategy", "fedsgd"], "--strategy: strategy must be one of"),
        (["--strategy-param", "eta"], "--strategy-param: strategy param 'eta' is not KEY=VALUE"),
        (["--lora-targets", "all-linear,q_proj"], "cannot be combined"),
        (["--lora-dropout", "1"], "--lora-dropout: lora_dropout must be < 1"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse(*argv)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_each_config_file_takes_only_its_owners_keys() -> None:
    server = {f.name for f in fields_for("round")}
    client = {f.name for f in fields_for("local")}
    assert server | client == {f.name for f in FIELDS} and server & client == {"lora_mode"}
    assert {"lr", "local_steps", "strategy", "lr_schedule"} <= server
    assert {"lora_rank", "device", "max_length", "grad_accum"} <= client
    got = overrides_from_mapping({"lr": 1, "kind": "train", "batch_size": 4}, "round")
    assert got == {"lr": 1.0, "batch_size": 4}  # other keys are the caller's
    with pytest.raises(RecipeError, match=r"task\.lora_rank cannot be set here.*client\.toml"):
        overrides_from_mapping({"lora_rank": 4}, "round", lambda k: f"task.{k}")
    with pytest.raises(RecipeError, match=r"train\.lr cannot be set here.*server\.toml \[task\]"):
        overrides_from_mapping({"lr": 0.1}, "local", lambda k: f"train.{k}")
    with pytest.raises(RecipeError, match=r"train\.max_length: max_length must be >= 8"):
        overrides_from_mapping({"max_length": 4}, "local", lambda k: f"train.{k}")
    assert overrides_from_mapping({"lora_targets": ["q_proj"]}, "local") == {
        "lora_targets": ("q_proj",)
    }


def test_recipe_checks_cross_field_rules() -> None:
    with pytest.raises(RecipeError, match="exactly one of local_steps and local_epochs"):
        Recipe(local_steps=None)
    with pytest.raises(RecipeError, match="grad_accum"):
        Recipe(batch_size=4, grad_accum=8)
    assert Recipe(batch_size=4, grad_accum=4).grad_accum == 4


def test_lr_schedules_over_rounds() -> None:
    assert [Recipe(lr=1.0).lr_at(r, 4) for r in range(4)] == [1.0] * 4
    cosine = [Recipe(lr=1.0, lr_schedule="cosine").lr_at(r, 4) for r in range(4)]
    assert cosine[0] == 1.0 and math.isclose(cosine[2], 0.5) and 0 < cosine[3] < cosine[2]
    linear = [Recipe(lr=1.0, lr_schedule="linear").lr_at(r, 4) for r in range(4)]
    assert linear == [1.0, 0.75, 0.5, 0.25]
    with pytest.raises(RecipeError):
        Recipe().lr_at(4, 4)


def test_dict_round_trip() -> None:
    recipe = PRETRAINED.with_overrides(
        {"lora_targets": ("c_attn",), "strategy": "fedprox", "strategy_params": (("mu", 0.1),)}
    )
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(RecipeError, match="unknown recipe keys: bogus"):
        Recipe.from_dict({"bogus": 1})


def test_strategies_get_their_measured_defaults_and_say_so() -> None:
    scaffold = resolve("embedded", {"strategy": "scaffold"})
    assert scaffold.recipe.optimizer == "sgd" and scaffold.recipe.lr == SCAFFOLD_SGD_LR["embedded"]
    assert "SCAFFOLD: clients train with plain SGD" in scaffold.notes[0]
    assert resolve("pretrained", {"strategy": "scaffold", "lr": 0.3}).recipe.lr == 0.3
    with pytest.raises(RecipeError, match="SCAFFOLD's control variates assume plain SGD"):
        resolve("embedded", {"strategy": "scaffold", "optimizer": "adamw"})
    adam = resolve("pretrained", {"strategy": "fedadam"})
    assert adam.recipe.params() == {"beta1": 0.0, "eta": PRETRAINED.lr}
    assert "eta = 1 x the client lr" in adam.notes[0]
    adagrad = resolve("embedded", {"strategy": "fedadagrad", "lr": 0.02})
    assert adagrad.recipe.params()["eta"] == pytest.approx(0.1)
    mine = resolve("embedded", {"strategy": "fedadam", "strategy_params": (("eta", 0.5),)})
    assert mine.recipe.params() == {"beta1": 0.0, "eta": 0.5}
    assert (
        resolve("embedded", {"strategy": "fedavgm"}).recipe.params() == STRATEGY_DEFAULTS["fedavgm"]
    )
    assert resolve("embedded", {}).recipe.params() == {} and resolve("embedded", {}).notes == ()


def test_stages_split_the_rounds_and_each_runs_its_own_schedule() -> None:
    sft = Recipe()
    assert sft.stage_rounds(8) == (8, 0) and sft.dpo_start(8) is None and not sft.has_dpo
    assert [sft.objective_at(r, 8) for r in (0, 7)] == ["sft", "sft"]
    dpo = Recipe(stage="dpo", dpo_lr=1e-3)
    assert dpo.stage_rounds(4) == (0, 4) and dpo.dpo_start(4) == 0
    assert dpo.lr_at(0, 4) == 1e-3 and dpo.peak_lr() == 1e-3
    both = Recipe(stage="sft+dpo", lr_schedule="linear", dpo_lr=4e-3)
    assert both.stage_rounds(8) == (4, 4)  # half by default
    assert [both.objective_at(r, 8) for r in range(8)] == ["sft"] * 4 + ["dpo"] * 4
    # Each stage decays from its own peak over its own rounds.
    assert [both.lr_at(r, 8) for r in range(8)] == pytest.approx(
        [1e-2, 7.5e-3, 5e-3, 2.5e-3, 4e-3, 3e-3, 2e-3, 1e-3]
    )
    assert both.peak_lr() == 1e-2
    three = Recipe(stage="sft+dpo", dpo_rounds=3)
    assert three.stage_rounds(5) == (2, 3) and three.dpo_start(5) == 2
    assert three.lr_at(4, 5) == three.lr  # dpo_lr unset: the DPO rounds use lr


def test_stage_settings_are_checked() -> None:
    with pytest.raises(RecipeError, match="dpo_rounds splits the rounds of stage sft\\+dpo"):
        Recipe(stage="dpo", dpo_rounds=2)
    with pytest.raises(RecipeError, match="1 <= dpo_rounds < 3"):
        Recipe(stage="sft+dpo", dpo_rounds=3).stage_rounds(3)
    with pytest.raises(RecipeError, match="got 0"):
        Recipe(stage="sft+dpo").stage_rounds(1)
    with pytest.raises(RecipeError, match="dpo_beta must be > 0"):
        Recipe(dpo_beta=-1.0)
    assert parse("--stage", "sft+dpo", "--dpo-rounds", "2", "--dpo-loss", "ipo") == {
        "stage": "sft+dpo",
        "dpo_rounds": 2,
        "dpo_loss": "ipo",
    }
    # Every DPO setting is the coordinator's: an institution's [train] table refuses it.
    with pytest.raises(RecipeError, match=r"coordinator's: set it in server\.toml \[task\]"):
        overrides_from_mapping({"dpo_beta": 0.2}, "local")
